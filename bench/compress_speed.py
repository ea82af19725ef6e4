"""How long CURing's decomposition takes: the 30 matrices of Llama-3.1-8B that the paper
compresses (10 blocks × q_proj 4096×4096, k_proj 1024×4096, gate_proj 14336×4096, r = 256),
random weights and activation norms — selection (rows and columns) and U included.

Two pipelines on the same matrices:
- `fast`: the product path — randomized SVD of the score, DEIM as one LU factorisation,
  U = C⁺WR⁺ (fp64 on CPU, fp32 SVD/selection).
- `textbook`: exact SVD and the textbook DEIM loop (one solve a step).
On a CPU the default divides every dimension and the rank by `--scale` 4 (the full size takes
minutes a matrix); BASELINE.md's H100 numbers are for the full size.

    python bench/compress_speed.py [--scale 4] [--layers 10] [--device cpu] [--out bench/results]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from curkernels.compress.curing import cur_decompose, leading_singular_vectors
from curkernels.compress.deim import deim_select, deim_select_reference

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096)}


def textbook_cur(weight: torch.Tensor, mean_sq: torch.Tensor, rank: int):
    score = weight.abs() * mean_sq.sqrt()
    left, right = leading_singular_vectors(score, rank, svd="exact")
    rows, cols = deim_select_reference(left), deim_select_reference(right)
    w = weight.double()
    C, R = w[:, cols], w[rows]
    return torch.linalg.pinv(C) @ w @ torch.linalg.pinv(R), rows, cols


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=4, help="divide shapes and rank by this")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-textbook", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; on a loaded 2-core machine OpenMP's spinning made "
                             "LAPACK calls 50-100x slower with 2 threads than with 1")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rank = args.rank // args.scale
    g = torch.Generator().manual_seed(0)
    matrices = [(name, torch.randn(m // args.scale, n // args.scale, generator=g) * 0.02,
                 torch.rand(n // args.scale, generator=g) + 0.1)
                for _ in range(args.layers) for name, (m, n) in SHAPES.items()]

    def run(pipeline):
        per_kind = dict.fromkeys(SHAPES, 0.0)
        sync(device)
        total_start = time.perf_counter()
        for name, w, act in matrices:
            w, act = w.to(device), act.to(device)
            start = time.perf_counter()
            pipeline(w, act)
            sync(device)
            per_kind[name] += time.perf_counter() - start
        return time.perf_counter() - total_start, per_kind

    # same singular vectors → same indices (checked on one matrix per shape)
    for name, w, act in matrices[:3]:
        left, right = leading_singular_vectors(w.abs() * act.sqrt(), rank, svd="exact")
        assert deim_select(left).tolist() == deim_select_reference(left).tolist(), name
        assert deim_select(right).tolist() == deim_select_reference(right).tolist(), name

    results = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda"
                             else f"cpu ({torch.get_num_threads()} threads)"),
               "scale": args.scale, "rank": rank, "matrices": len(matrices),
               "shapes": {k: [m // args.scale, n // args.scale] for k, (m, n) in SHAPES.items()}}
    total, per_kind = run(lambda w, act: cur_decompose(w, act, rank))
    results["fast"] = {"seconds": total, "per_kind": per_kind}
    print(f"fast: {total:.2f} s for {len(matrices)} matrices ({per_kind})", flush=True)
    if not args.skip_textbook:
        total, per_kind = run(lambda w, act: textbook_cur(w, act, rank))
        results["textbook"] = {"seconds": total, "per_kind": per_kind}
        print(f"textbook: {total:.2f} s ({per_kind})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{device.type}_scale{args.scale}"
    (out / f"compress_speed_{tag}.json").write_text(json.dumps(results, indent=2))
    lines = [f"# CURing decomposition time, {results['device']}",
             "", f"{len(matrices)} matrices (10 × q/k/gate of Llama-3.1-8B, every dimension and "
             f"the rank divided by {args.scale}: {results['shapes']}, r = {rank}).", "",
             "| pipeline | seconds | q | k | gate |", "|---|---|---|---|---|"]
    for key in ("fast", "textbook"):
        if key in results:
            p = results[key]["per_kind"]
            lines.append(f"| {key} | {results[key]['seconds']:.2f} | {p['q_proj']:.2f} | "
                         f"{p['k_proj']:.2f} | {p['gate_proj']:.2f} |")
    (out / f"compress_speed_{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
