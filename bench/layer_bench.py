"""Time one factored layer against the dense layer and the cuBLAS chains.

Variants, all on the same random factors (U full, c = r, as CURing stores it):
  dense   F.linear(x, W)                    the layer before compression
  chain3  F.linear(F.linear(F.linear(x, R), U), C)   the CURing paper's module
  chain2  F.linear(F.linear(x, R), C·U)     U folded, two cuBLAS GEMMs
  triton  curkernels' Triton backend on (C·U, R)
  cuda    curkernels' CUDA extension on (C·U, R)
  module  a frozen CURLinear(C, U, R) called as a user would: validation, dispatch ('auto'),
          U folded automatically — the eager decode claims are about this one
Each is timed eagerly (host overhead included) and as CUDA-graph replays, with cold weights:
every call reads a different copy of the weights it uses, cycling over enough copies to exceed
twice the L2 cache (read from the device), as in a real decode step. Medians over repeats; µs
a call.

GPU:    python bench/layer_bench.py --out bench/results
CPU:    TRITON_INTERPRET=1 python bench/layer_bench.py --smoke --out /tmp/x   (format check)
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import write_reports  # noqa: E402

from curkernels.nn import CURLinear  # noqa: E402
from curkernels.ops.settings import ENV_DECODE_CONFIGS  # noqa: E402
from curkernels.ops.tables import DECODE_MAX_ROWS  # noqa: E402

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # (out m, in n), Llama-3.1-8B
RANKS = (256, 512, 1024)
# 32: batched decode (batch 32), which the Triton decode kernel takes in one launch
ROWS = (1, 4, 16, 32, 128, 1024, 4096)
VARIANTS = ("dense", "chain3", "chain2", "triton", "cuda", "module")
SMOKE_SHAPES, SMOKE_RANKS, SMOKE_ROWS = ((96, 80),), (8,), (1, 20, 70)


@dataclass
class Timing:
    m: int
    n: int
    r: int
    M: int
    variant: str
    eager_us: float | None
    graph_us: float | None
    note: str = ""


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def measure_ceilings(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 GEMM rate, measured on this card."""
    if device.type != "cuda":
        return {"copy_tb_s": None, "gemm_tflop_s": None}
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    copy_ms = _cuda_median_ms(lambda: dst.copy_(src), repeats=20)
    gemm_ms = _cuda_median_ms(lambda: a @ a, repeats=10)
    return {"copy_tb_s": 2 * src.numel() / copy_ms / 1e9, "gemm_tflop_s": 2 * 8192 ** 3 / gemm_ms / 1e9}


def _cuda_median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def floor_us(m, n, r, M, dtype, ceilings) -> float | None:
    """max(bytes of C, R, x, y over copy bandwidth, flops over GEMM rate) with U folded."""
    if ceilings["copy_tb_s"] is None:
        return None
    bytes_moved = (m * r + r * n + M * n + M * m) * _elem(dtype)
    flops = 2 * M * r * (n + m)
    return max(bytes_moved / (ceilings["copy_tb_s"] * 1e6), flops / (ceilings["gemm_tflop_s"] * 1e6))


def _cold_copies(bytes_per_call: int, l2_bytes: int) -> int:
    """Copies to cycle over so that the weights a call reads were evicted since their last use."""
    return max(2, -(-2 * l2_bytes // bytes_per_call))


def _weight_sets(m, n, r, dtype, device, l2_bytes) -> dict[str, list[dict]]:
    """Rotations per variant family: dense weights W, and the factors (C, U, R, C·U)."""
    elem = _elem(dtype)
    dense = [{"W": torch.randn(m, n, device=device, dtype=dtype) / n ** 0.5}
             for _ in range(_cold_copies(m * n * elem, l2_bytes))]
    factors = []
    for _ in range(_cold_copies((m * r + r * n) * elem, l2_bytes)):
        C = torch.randn(m, r, device=device, dtype=dtype) / r ** 0.5
        U = torch.randn(r, r, device=device, dtype=dtype) / r ** 0.5
        R = torch.randn(r, n, device=device, dtype=dtype) / n ** 0.5
        factors.append({"C": C, "U": U, "R": R, "CU": (C.float() @ U.float()).to(dtype),
                        "module": CURLinear(C, U, R, trainable=())})
    return {"dense": dense, "factors": factors}


def _variant_fn(variant: str):
    if variant == "dense":
        return lambda x, w: F.linear(x, w["W"])
    if variant == "chain3":
        return lambda x, w: F.linear(F.linear(F.linear(x, w["R"]), w["U"]), w["C"])
    if variant == "chain2":
        return lambda x, w: F.linear(F.linear(x, w["R"]), w["CU"])
    if variant == "module":
        return lambda x, w: w["module"](x)
    if variant == "triton":
        from curkernels.ops.triton.backend import cur_linear_triton
        return lambda x, w: cur_linear_triton(x, w["CU"], None, w["R"], None, None)
    from curkernels.ops.cuda import cur_linear_cuda
    return lambda x, w: cur_linear_cuda(x, w["CU"], None, w["R"], None, None)


def _unavailable(variant: str, device: torch.device) -> str | None:
    if variant not in ("triton", "cuda"):
        return None
    from curkernels.ops import unavailable_reason
    return unavailable_reason(variant, device)


def time_eager_us(fn, x, sets, calls: int, repeats: int) -> float:
    """Per-call time of `calls` back-to-back calls, host overhead included (median of repeats)."""
    cuda = x.device.type == "cuda"
    for w in sets[:2]:
        fn(x, w)  # compile, tune, create workspaces
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(calls):
            fn(x, sets[i % len(sets)])
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def time_graph_us(fn, x, sets, calls: int, repeats: int) -> float:
    """Per-call time of a captured sequence of `calls` calls over rotating weights."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in sets:
            fn(x, w)  # warm up on the capture stream (workspaces are per stream)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(x, sets[i % len(sets)])
    graph.replay()
    return 1e3 * _cuda_median_ms(graph.replay, repeats) / calls


def _calls_for(M: int, cold_sets: int) -> int:
    """Calls per timed sequence: every cold copy at least once, enough to average launches."""
    return max(cold_sets, 32 if M <= DECODE_MAX_ROWS else 8)


def run(shapes, ranks, rows, dtype, device, repeats, calls=None,
        budget_s=None) -> tuple[list[Timing], dict]:
    """Decode sizes (M ≤ DECODE_MAX_ROWS, the main target) first, then prefill; past `budget_s`
    seconds the remaining sizes are recorded as not run."""
    started = time.perf_counter()
    ceilings = measure_ceilings(device)
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    results = []
    passes = [[M for M in rows if M <= DECODE_MAX_ROWS], [M for M in rows if M > DECODE_MAX_ROWS]]
    for group in (group for group in passes if group):
        for m, n in shapes:
            for r in ranks:
                if budget_s is not None and time.perf_counter() - started > budget_s:
                    results += [Timing(m, n, r, M, variant, None, None, "time budget spent")
                                for M in group for variant in VARIANTS]
                    continue
                rotations = _weight_sets(m, n, r, dtype, device, l2_bytes)
                for M in group:
                    results += _time_variants(m, n, r, M, dtype, device, rotations, repeats, calls)
                del rotations
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return results, ceilings


def _time_variants(m, n, r, M, dtype, device, rotations, repeats, calls) -> list[Timing]:
    x = torch.randn(M, n, device=device, dtype=dtype)
    timings = []
    for variant in VARIANTS:
        reason = _unavailable(variant, device)
        if reason is not None:
            timings.append(Timing(m, n, r, M, variant, None, None, reason))
            continue
        sets = rotations["dense" if variant == "dense" else "factors"]
        sequence = calls or _calls_for(M, len(sets))
        fn = _variant_fn(variant)
        eager = time_eager_us(fn, x, sets, sequence, repeats)
        graph = time_graph_us(fn, x, sets, sequence, repeats) if device.type == "cuda" else None
        timings.append(Timing(m, n, r, M, variant, eager, graph))
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="folder for JSON/markdown/PNG")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU allowed")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which the remaining sizes are skipped")
    parser.add_argument("--ranks", default=None,
                        help=f"comma-separated ranks (default {','.join(map(str, RANKS))})")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: the full benchmark needs a GPU (use --smoke for a check)")
    dtype = getattr(torch, args.dtype)
    if args.smoke and device.type == "cpu":
        dtype = torch.float32  # CPU matmuls and the Triton interpreter lack bf16 arithmetic
    shapes, ranks, rows = (SMOKE_SHAPES, SMOKE_RANKS, SMOKE_ROWS) if args.smoke else (SHAPES, RANKS, ROWS)
    if args.ranks:
        ranks = tuple(int(rank) for rank in args.ranks.split(","))
    repeats = args.repeats or (2 if args.smoke else 7)
    started = time.perf_counter()
    # The smoke run checks the pipeline, not speed: the interpreter takes ~0.1 s a launch.
    with torch.no_grad():
        results, ceilings = run(shapes, ranks, rows, dtype, device, repeats,
                                calls=2 if args.smoke else None, budget_s=args.budget)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"device": gpu, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "ceilings": ceilings, "seconds": round(time.perf_counter() - started, 1),
            "l2_bytes": torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else None,
            # where the Triton decode configs came from: a sweep of this run, or the shipped ones
            "decode_configs": os.environ.get(ENV_DECODE_CONFIGS) or "shipped"}
    floors = {(m, n, r, M): floor_us(m, n, r, M, dtype, ceilings)
              for m, n in shapes for r in ranks for M in rows}
    table = write_reports([asdict(t) for t in results], floors, meta, Path(args.out))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
