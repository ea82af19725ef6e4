"""Compare tile configs of the Triton decode kernel side by side, with chain2 as the yardstick.

For each Llama-3.1-8B layer shape, rank and M ∈ {1, 16}, every config in CONFIGS is first
checked against an fp64 reference on fresh inputs (output poisoned), then timed exactly as
`layer_bench.py` times `triton`: CUDA-graph replays over cold weights, median µs per call.
Writes decode_sweep.json to --out and prints a table (best config per point last).

GPU:    python bench/decode_sweep.py --out bench/results
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_bench import SHAPES, _calls_for, _weight_sets, floor_us, measure_ceilings, time_graph_us  # noqa: E402

from curkernels.ops.triton_backend import DecodeConfig, cur_linear_decode  # noqa: E402
from curkernels.ops.triton_decode import PDL_SUPPORTED  # noqa: E402

# Two programs per SM run last: the grid barrier needs both resident. The backend lowers the
# count to what fits (triton_backend._programs_per_sm), but a GPU running other work could
# still hold one back.
# 64 KB of L2 prefetch a program is about what DRAM streams across a barrier of ~2 µs on 132
# SMs, and all of C at 4096×4096, r = 1024; with two programs per SM, 32 KB each is the same.
CONFIGS = {
    "default": DecodeConfig(),
    "l2-64k": DecodeConfig(l2_prefetch_bytes=65536),
    "w8-r64": DecodeConfig(num_warps=8, block_r=64, block_out=64),
    "pdl": DecodeConfig(pdl=True),
    "2/sm": DecodeConfig(programs_per_sm=2),
    "2/sm-r64": DecodeConfig(block_r=64, block_out=64, programs_per_sm=2),
    "2/sm-prefetch16k": DecodeConfig(prefetch_bytes=16384, programs_per_sm=2),
    "2/sm-pdl": DecodeConfig(programs_per_sm=2, pdl=True),
    "2/sm-l2-32k": DecodeConfig(programs_per_sm=2, l2_prefetch_bytes=32768),
}
if not PDL_SUPPORTED:  # before Triton 3.5 the launch plan refuses PDL
    CONFIGS = {name: config for name, config in CONFIGS.items() if not config.pdl}
ROWS = (1, 16)
RANKS = (256, 1024, 2048, 512)  # 2048: keep 0.5 of a 14336×4096 projection is r ≈ 1536


def relative_error(config: DecodeConfig, m, n, r, M, dtype, device) -> float:
    """‖y − ref‖ / ‖ref‖ on fresh random operands, y poisoned with NaN before the call."""
    x = torch.randn(M, n, device=device, dtype=dtype)
    C = torch.randn(m, r, device=device, dtype=dtype) / r ** 0.5
    R = torch.randn(r, n, device=device, dtype=dtype) / n ** 0.5
    y = torch.full((M, m), float("nan"), device=device, dtype=dtype)
    cur_linear_decode(x, C, None, R, None, None, y, config)
    reference = F.linear(F.linear(x.double(), R.double()), C.double())
    return ((y.double() - reference).norm() / reference.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds after which the remaining shapes are skipped")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device: the sweep times GPU kernels")
    device, dtype = torch.device("cuda"), torch.bfloat16
    started = time.perf_counter()
    ceilings = measure_ceilings(device)
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for m, n in SHAPES:
            for r in RANKS:
                if time.perf_counter() - started > args.budget:
                    continue
                sets = _weight_sets(m, n, r, dtype, device, l2_bytes)["factors"]
                for M in ROWS:
                    x = torch.randn(M, n, device=device, dtype=dtype)
                    calls = _calls_for(M, len(sets))
                    row = {"m": m, "n": n, "r": r, "M": M,
                           "floor_us": floor_us(m, n, r, M, dtype, ceilings),
                           "chain2": time_graph_us(
                               lambda x, w: F.linear(F.linear(x, w["R"]), w["CU"]),
                               x, sets, calls, args.repeats), "errors": {}}
                    for name, config in CONFIGS.items():
                        row["errors"][name] = relative_error(config, m, n, r, M, dtype, device)

                        def fn(x, w, config=config):
                            y = torch.empty((x.shape[0], w["CU"].shape[0]), device=x.device,
                                            dtype=x.dtype)
                            cur_linear_decode(x, w["CU"], None, w["R"], None, None, y, config)
                            return y
                        row[name] = time_graph_us(fn, x, sets, calls, args.repeats)
                    rows.append(row)
                    # written after every point: a hang later (a barrier whose programs were
                    # not all resident) still leaves what was measured
                    (out / "decode_sweep.json").write_text(json.dumps(
                        {"device": torch.cuda.get_device_name(device),
                         "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                         "ceilings": ceilings, "configs": {k: vars(v) for k, v in CONFIGS.items()},
                         "rows": rows}, indent=1))
                del sets
                torch.cuda.empty_cache()
    names = list(CONFIGS)
    print(f"{'m×n':>11} {'r':>5} {'M':>3} {'floor':>6} {'chain2':>7} "
          + " ".join(f"{name[:11]:>11}" for name in names) + "  best")
    for row in rows:
        best = min(names, key=lambda name: row[name])
        bad = [name for name in names if not row["errors"][name] < 2e-2]
        print(f"{row['m']:>5}×{row['n']:<5} {row['r']:>5} {row['M']:>3} {row['floor_us']:6.1f} "
              f"{row['chain2']:7.1f} " + " ".join(f"{row[name]:11.1f}" for name in names)
              + f"  {best}" + (f"  WRONG: {bad}" if bad else ""))
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
