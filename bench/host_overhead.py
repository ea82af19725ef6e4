"""Host time per eager forward call: nn.Linear against CURLinear (two and three factors).

On the CPU, at tiny sizes (default 64×64, r = 8, M = 1, fp32) the arithmetic is negligible, so
the times are the Python and dispatcher cost of each layer; the factored modules run the torch
backend there (two or three GEMMs), so this measures the Python layers above the kernels, not a
kernel launch. On a GPU (--device cuda, e.g. 4096×4096, r = 256, bf16) it times the enqueue
cost of each call: the GPU is synchronised between rounds, never inside one.
With --stub-cuda-launch (CPU) the CUDA extension's op is replaced by a stub that returns a
preallocated output and dispatch is told the extension runs: "CURLinear (CUDA path, launch
stubbed)" then times the Python path from the module to the extension's launch alone.

    python bench/host_overhead.py                      # CPU
    python bench/host_overhead.py --stub-cuda-launch   # CPU, the eager CUDA-extension path
    python bench/host_overhead.py --device cuda --size 4096 --rank 256 --dtype bfloat16

Prints the median per-call time of each variant over --rounds rounds of --calls calls (the
variants take turns within each round), and its ratio to nn.Linear's.
"""

import argparse
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from curkernels.nn import CURLinear
from curkernels.ops import dispatch


def _time_per_call(variants: dict, calls: int, rounds: int, sync) -> dict[str, float]:
    """Median over rounds of the mean host time (µs) per call within a round. The variants take
    turns inside each round, so that a noisy neighbour slows all of them alike."""
    samples = {name: [] for name in variants}
    for round_index in range(rounds + 1):  # the first round warms up
        for name, call in variants.items():
            sync()
            start = time.perf_counter_ns()
            for _ in range(calls):
                call()
            if round_index:
                samples[name].append((time.perf_counter_ns() - start) / calls / 1e3)
    sync()
    return {name: statistics.median(times) for name, times in samples.items()}


def _stub_cuda_launch(output: torch.Tensor) -> None:
    """The CUDA extension as dispatch sees it, its launch a stub returning `output`."""
    binding = types.ModuleType("curkernels.ops.cuda")
    binding.cur_linear_cuda = lambda x, C, U, R, bias, rows: output
    # Under the extension module's name now and before the ops/ layout (b782f0c's
    # curkernels.ops.cuda_backend): one script times the eager path of both trees.
    for name in ("curkernels.ops.cuda", "curkernels.ops.cuda_backend"):
        sys.modules[name] = binding
    dispatch.unavailable_reason = lambda backend, device: None


def _variants(size: int, rank: int, rows: int, dtype: torch.dtype, device: str,
              sequence: bool, stub_cuda_launch: bool) -> dict:
    torch.manual_seed(0)
    dense = nn.Linear(size, size, bias=False, device=device, dtype=dtype)
    x = torch.randn(*((1,) if sequence else ()), rows, size, device=device, dtype=dtype)
    A = torch.randn(size, rank, device=device, dtype=dtype) / rank ** 0.5
    B = torch.randn(rank, size, device=device, dtype=dtype) / size ** 0.5
    cur_two = CURLinear(A, None, B, trainable=())
    cur_full = CURLinear(A, torch.eye(rank, device=device, dtype=dtype), B, trainable=())
    variants = {
        "nn.Linear": lambda: dense(x),
        "F.linear": lambda: F.linear(x, dense.weight),
        "F.linear x2 (bare chain)": lambda: F.linear(F.linear(x, B), A),
        "CURLinear (U=None)": lambda: cur_two(x),
        "CURLinear (frozen full U)": lambda: cur_full(x),
    }
    if stub_cuda_launch:
        _stub_cuda_launch(torch.empty(*x.shape[:-1], size, device=device, dtype=dtype))
        cur_stubbed = CURLinear(A, None, B, trainable=(), backend="cuda")
        variants["CURLinear (CUDA path, launch stubbed)"] = lambda: cur_stubbed(x)
    if device == "cuda":
        x2d = x.reshape(-1, size)
        try:
            import curkernels._C  # noqa: F401
        except ImportError:
            pass
        else:
            op = torch.ops.curkernels_C.cur_linear.default
            variants["raw CUDA op"] = lambda: op(x2d, A, None, B, None, None)
        from curkernels.ops.tables import DECODE_MAX_ROWS
        from curkernels.ops.triton.backend import cur_linear_triton
        if rows <= DECODE_MAX_ROWS:
            variants["raw Triton decode"] = lambda: cur_linear_triton(x, A, None, B, None, None)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1, help="M, the input rows")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sequence", action="store_true",
                        help="x as (1, M, n), the shape a transformer layer passes")
    parser.add_argument("--stub-cuda-launch", action="store_true",
                        help="CPU: time the eager CUDA-extension path with its launch stubbed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    variants = _variants(args.size, args.rank, args.rows, getattr(torch, args.dtype),
                         args.device, args.sequence, args.stub_cuda_launch)
    print(f"{args.device}, {args.size}x{args.size}, r={args.rank}, M={args.rows}"
          f"{' as (1, M, n)' if args.sequence else ''}, {args.dtype}, "
          f"torch.no_grad; median of {args.rounds} rounds x {args.calls} calls")
    with torch.no_grad():
        times = _time_per_call(variants, args.calls, args.rounds, sync)
    for name, us in times.items():
        print(f"  {name:<28} {us:8.2f} us/call  {us / times['nn.Linear']:5.2f}x nn.Linear")


if __name__ == "__main__":
    main()
