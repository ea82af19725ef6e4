"""Compare tile configs of the Triton decode kernel side by side, with chain2 as the yardstick.

For each Llama-3.1-8B layer shape, rank and M in --rows (default 1, 16 and 32: batched decode
runs its own row block's tiles), every candidate in CANDIDATES is first checked against an fp64
reference on fresh inputs (output poisoned), then timed exactly as `layer_bench.py` times
`triton`: CUDA-graph replays over cold weights, median µs per call. A candidate that cannot
launch at a point (its tiles past the GPU's shared memory, say) is recorded as failed there and
the sweep goes on. Writes decode_sweep.json to --out after every point and prints a table (best
config per point last).

GPU:    python bench/decode_sweep.py --out bench/results
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_bench import SHAPES, _calls_for, _weight_sets, floor_us, measure_ceilings, time_graph_us  # noqa: E402

from curkernels.ops.tables import WRONG  # noqa: E402
from curkernels.ops.triton.decode import (  # noqa: E402
    DEFAULT_DECODE_CONFIGS,
    DecodeConfig,
    cur_linear_decode,
    decode_block_rows,
)
from curkernels.ops.triton.decode_kernels import PDL_SUPPORTED  # noqa: E402

# Each candidate overrides fields of the default config of the call's row block (16, 32 or 64
# input rows a tile: DEFAULT_DECODE_CONFIGS), which is how ops/tables.py reads them back.
# Two programs per SM run last: the grid barrier needs both resident. The backend lowers the
# count to what fits (ops/triton/decode.py's _programs_per_sm), but a GPU running other work could
# still hold one back.
# 64 KB of L2 prefetch a program is about what DRAM streams across a barrier of ~2 µs on 132
# SMs, and all of C at 4096×4096, r = 1024; with two programs per SM, 32 KB each is the same.
# 64-row expand tiles halve how often the expand re-reads the fp32 intermediate, which at 32
# rows and r = 1024 is 128 KB a tile.
CANDIDATES = {
    "default": {},
    "l2-64k": {"l2_prefetch_bytes": 65536},
    "w8-r64": {"num_warps": 8, "block_r": 64, "block_out": 64},
    "pdl": {"pdl": True},
    "2/sm": {"programs_per_sm": 2},
    "2/sm-r64": {"block_r": 64, "block_out": 64, "programs_per_sm": 2},
    "2/sm-prefetch16k": {"prefetch_bytes": 16384, "programs_per_sm": 2},
    "2/sm-pdl": {"programs_per_sm": 2, "pdl": True},
    "2/sm-l2-32k": {"programs_per_sm": 2, "l2_prefetch_bytes": 32768},
}
if not PDL_SUPPORTED:  # before Triton 3.5 the launch plan refuses PDL
    CANDIDATES = {name: fields for name, fields in CANDIDATES.items()
                  if not fields.get("pdl")}
ROWS = (1, 16, 32)
RANKS = (256, 1024, 2048, 512)  # 2048: keep 0.5 of a 14336×4096 projection is r ≈ 1536


def config_for(name: str, M: int) -> DecodeConfig:
    """Candidate `name` for a call of M rows: its overrides on that row block's default."""
    return dataclasses.replace(DEFAULT_DECODE_CONFIGS[decode_block_rows(M)], **CANDIDATES[name])


def relative_error(config: DecodeConfig, m, n, r, M, dtype, device) -> float:
    """‖y − ref‖ / ‖ref‖ on fresh random operands, y poisoned with NaN before the call."""
    x = torch.randn(M, n, device=device, dtype=dtype)
    C = torch.randn(m, r, device=device, dtype=dtype) / r ** 0.5
    R = torch.randn(r, n, device=device, dtype=dtype) / n ** 0.5
    y = torch.full((M, m), float("nan"), device=device, dtype=dtype)
    cur_linear_decode(x, C, None, R, None, None, y, config)
    reference = F.linear(F.linear(x.double(), R.double()), C.double())
    return ((y.double() - reference).norm() / reference.norm()).item()


def _rows_argument(text: str) -> tuple[int, ...]:
    rows = tuple(int(value) for value in text.split(","))
    for M in rows:
        decode_block_rows(M)  # a ValueError (argparse reports it) outside 1..the kernel's most
    return rows


def time_point(m, n, r, M, sets, dtype, device, ceilings, repeats) -> dict:
    """chain2 and every candidate at one (M, m, n, r): times in µs (None: failed), relative
    errors, and why a candidate failed."""
    x = torch.randn(M, n, device=device, dtype=dtype)
    calls = _calls_for(M, len(sets))
    row = {"m": m, "n": n, "r": r, "M": M, "floor_us": floor_us(m, n, r, M, dtype, ceilings),
           "chain2": time_graph_us(lambda x, w: F.linear(F.linear(x, w["R"]), w["CU"]),
                                   x, sets, calls, repeats),
           "errors": {}, "failures": {}}
    for name in CANDIDATES:
        config = config_for(name, M)

        def fn(x, w, config=config):
            y = torch.empty((x.shape[0], w["CU"].shape[0]), device=x.device, dtype=x.dtype)
            cur_linear_decode(x, w["CU"], None, w["R"], None, None, y, config)
            return y
        try:  # the correctness check compiles and launches first, outside any graph
            row["errors"][name] = relative_error(config, m, n, r, M, dtype, device)
            row[name] = time_graph_us(fn, x, sets, calls, repeats)
        except Exception as error:  # one candidate's failure is a result, not the end
            row[name] = None
            row["failures"][name] = f"{type(error).__name__}: {error}"[:300]
    return row


def print_table(rows: list[dict]) -> None:
    names = list(CANDIDATES)
    print(f"{'m×n':>11} {'r':>5} {'M':>3} {'floor':>6} {'chain2':>7} "
          + " ".join(f"{name[:11]:>11}" for name in names) + "  best")
    for row in rows:
        timed = [name for name in names if row[name] is not None]
        best = min(timed, key=row.__getitem__) if timed else "-"
        wrong = [name for name in timed if not row["errors"][name] < WRONG]
        failed = sorted(row.get("failures", {}))
        print(f"{row['m']:>5}×{row['n']:<5} {row['r']:>5} {row['M']:>3} {row['floor_us']:6.1f} "
              f"{row['chain2']:7.1f} "
              + " ".join(f"{row[name]:11.1f}" if row[name] is not None else f"{'failed':>11}"
                         for name in names)
              + f"  {best}" + (f"  WRONG: {wrong}" if wrong else "")
              + (f"  FAILED: {failed}" if failed else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=_rows_argument, default=ROWS,
                        help="comma-separated input row counts (default: %(default)s)")
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
                for M in args.rows:
                    rows.append(time_point(m, n, r, M, sets, dtype, device, ceilings,
                                           args.repeats))
                    # written after every point: a hang later (a barrier whose programs were
                    # not all resident) still leaves what was measured
                    (out / "decode_sweep.json").write_text(json.dumps(
                        {"device": torch.cuda.get_device_name(device),
                         "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                         "ceilings": ceilings, "configs": CANDIDATES, "rows": rows}, indent=1))
                del sets
                torch.cuda.empty_cache()
    print_table(rows)
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
