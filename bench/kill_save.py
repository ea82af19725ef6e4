"""Kill saves at random points (`kill -9`) and check that nothing is lost (issue 17).

Two kinds of killed writer, each replacing an existing checkpoint OUT:
- `api`: a process that loads checkpoint B and runs `ck.save_compressed(B, OUT, overwrite=True)`
  while OUT holds checkpoint A; it is killed a uniform random time into the save (0 to 1.2 × a
  measured unkilled save).
- `compress`: `curkernels compress DENSE OUT --keep 0.3 --overwrite` while OUT holds the same
  model compressed at keep 0.5; killed a uniform random time after it prints its compression
  report (the save follows it at once), over the same span.
After each kill OUT must load and equal the old or the new checkpoint, and a save of the old
checkpoint in this process (the next successful save) must leave no staging folder beside OUT.
A kill that arrives after the writer has announced its finished save is not counted; the writer
is started again.

    python bench/kill_save.py [--saves 24] [--compress 6] [--hidden 384] [--vocab 8000]
        [--layers 4] [--seed 0] [--out bench/results]
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import curkernels as ck
from curkernels.checkpoint.atomic import staging_folders

REPOSITORY = Path(__file__).resolve().parents[1]
SPAN = 1.2  # kill times are drawn over this multiple of an unkilled save
API_WRITER = """
import sys
import curkernels as ck
model = ck.load_compressed(sys.argv[1])
print("ready", flush=True)
ck.save_compressed(model, sys.argv[2], overwrite=True)
print("saved", flush=True)
"""
SAVED = "saved"  # how both writers announce a finished save


def writer_environment() -> dict:
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def api_command(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", API_WRITER, str(source), str(out)]


def compress_command(dense: Path, out: Path, keep: float) -> list[str]:
    return [sys.executable, "-m", "curkernels", "compress", str(dense), str(out), "--method",
            "svd", "--keep", str(keep), "--overwrite"]


def start_writer(command: list[str]) -> tuple[subprocess.Popen, float]:
    """The writer, once it has printed its first line (it starts saving right after)."""
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=writer_environment())
    if not writer.stdout.readline():
        raise RuntimeError(f"{command} exited with {writer.wait()} before its first output")
    return writer, time.perf_counter()


def unkilled_save_seconds(command: list[str]) -> float:
    """From the writer's first line to its announcing the finished save."""
    writer, started = start_writer(command)
    for line in writer.stdout:
        if line.startswith(SAVED):
            seconds = time.perf_counter() - started
            break
    else:
        raise RuntimeError(f"{command} exited with {writer.wait()} without saving")
    writer.stdout.read()
    writer.wait()
    return seconds


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return ck.load_compressed(folder).state_dict()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.allclose(
        a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def kill_once(command: list[str], span: float, out: Path, old_model, old: dict, new: dict,
              rng: random.Random) -> dict | None:
    """One killed writer and the checks after it; None when its save had finished first."""
    writer, started = start_writer(command)
    delay = rng.uniform(0, span)
    time.sleep(max(0.0, delay - (time.perf_counter() - started)))
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    if any(line.startswith(SAVED) for line in writer.stdout.read().splitlines()):
        return None
    left = staging_folders(out)
    row = {"delay_s": round(delay, 3), "staging_after_kill": len(left),
           "staging_mb": round(sum(folder_megabytes(f) for f in left), 1)}
    try:
        loaded = tensors(out)
        row["out"] = "old" if same(loaded, old) else "new" if same(loaded, new) else "neither"
    except Exception as error:  # noqa: BLE001 - any failure to load is what this counts
        row["out"] = f"not loadable: {type(error).__name__}: {error}"[:300]
    ck.save_compressed(old_model, out, overwrite=True)
    row["staging_after_next_save"] = len(staging_folders(out))
    row["out_after_next_save"] = "old" if same(tensors(out), old) else "other"
    return row


def kill_series(kind: str, count: int, command: list[str], out: Path, old_folder: Path,
                new: dict, rng: random.Random) -> dict:
    old_model = ck.load_compressed(old_folder)
    old = old_model.state_dict()
    ck.save_compressed(old_model, out, overwrite=True)
    span = SPAN * unkilled_save_seconds(command)
    ck.save_compressed(old_model, out, overwrite=True)
    rows, finished_first = [], 0
    while len(rows) < count:
        row = kill_once(command, span, out, old_model, old, new, rng)
        if row is None:
            finished_first += 1
            if finished_first > 3 * count:
                raise RuntimeError(f"{kind}: the writer kept finishing before the kill")
            continue
        rows.append(row)
        print(f"{kind} kill {len(rows)}/{count}: {row}", flush=True)
    return {"kind": kind, "span_s": round(span, 3), "finished_before_kill": finished_first,
            "kills": rows}


def summary(series: dict) -> dict:
    rows = series["kills"]
    return {"kind": series["kind"], "kills": len(rows),
            "out old": sum(r["out"] == "old" for r in rows),
            "out new": sum(r["out"] == "new" for r in rows),
            "out neither / not loadable": sum(r["out"] not in ("old", "new") for r in rows),
            "staging left by the kill": sum(r["staging_after_kill"] > 0 for r in rows),
            "staging left after next save": sum(r["staging_after_next_save"] for r in rows),
            "next save wrong": sum(r["out_after_next_save"] != "old" for r in rows)}


def dense_model(args) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=24, help="kills of the api writer")
    parser.add_argument("--compress", type=int, default=6, help="kills of curkernels compress")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    results = {"args": vars(args), "series": []}
    with tempfile.TemporaryDirectory(prefix="kill_save-") as work:
        work = Path(work)
        dense = work / "dense"
        dense_model(args).save_pretrained(dense)
        for name, keep in (("a", 0.5), ("b", 0.3)):
            model = LlamaForCausalLM.from_pretrained(dense)
            ck.compress(model, method="svd", keep=keep)
            ck.save_compressed(model, work / name)
        results["checkpoint_mb"] = round(folder_megabytes(work / "a"), 1)
        results["series"].append(kill_series(
            "api", args.saves, api_command(work / "b", work / "out_api"), work / "out_api",
            work / "a", tensors(work / "b"), rng))
        results["series"].append(kill_series(
            "compress", args.compress, compress_command(dense, work / "out_cli", 0.3),
            work / "out_cli", work / "a", tensors(work / "b"), rng))
    results["summary"] = [summary(s) for s in results["series"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kill_save.json").write_text(json.dumps(results, indent=2))
    columns = list(results["summary"][0])
    print(f"checkpoint {results['checkpoint_mb']} MB; kill times uniform over "
          f"{[s['span_s'] for s in results['series']]} s")
    print(" | ".join(columns))
    for row in results["summary"]:
        print(" | ".join(str(row[c]) for c in columns))
    print(f"wrote {out / 'kill_save.json'}")
    return results


if __name__ == "__main__":
    main()
