"""Choose the backend of one `cur_linear` call.

A named backend (argument or CURKERNELS_BACKEND) runs or raises; it never falls back. 'auto'
follows an explicit table, by device, execution mode (eager or CUDA graph / compile), M and
dtype. Every entry that picks a fused kernel rests on a measurement; where there is none the
cuBLAS chain (the torch backend) is kept. Sources (../shared/BASELINE.md, H100, bf16):

- Eager decode: each launch costs host time — chain2 takes 43.6–65.8 µs a call eager against
  8.9–15.8 µs on the GPU, and chain3 twice the dense layer. One fused launch removes two of
  the three launches, so eager decode (M ≤ 16) goes to a fused kernel: the CUDA extension
  (a C++ op, the cheaper host path), else Triton.
- Decode inside a CUDA graph being captured (torch.cuda.graph, torch.compile's
  "reduce-overhead" mode; the op resolves its backend when it runs): only a
  persistent single-launch Triton kernel was measured, and it lost to chain2 at r = 1024
  (15.0 vs 13.8 µs on 4096×4096, 22.1 vs 20.4 on 14336×4096) while winning at r = 256. The
  kernels here are unmeasured, so the chain stays until `bench/gpu_check.sh` shows otherwise:
  record a win in GRAPH_DECODE_WINNERS.
- Prefill (M > 16): no fused prefill kernel has been measured; cuBLAS chain.
"""

import os

import torch

from .backends import BACKENDS, unavailable_reason
from .errors import BackendUnavailableError

ENV_BACKEND = "CURKERNELS_BACKEND"
DECODE_MAX_ROWS = 16

# GPU name (torch.cuda.get_device_name) -> {(dtype, largest M): backend}, from
# bench/results/<gpu>.json: a fused backend belongs here only where it beat chain2 at every
# shape and rank benchmarked for that dtype and M in CUDA graphs. Empty: nothing measured yet.
GRAPH_DECODE_WINNERS: dict[str, dict[tuple[torch.dtype, int], str]] = {}


def requested_backend(backend: str) -> str:
    """The argument, unless it is 'auto' and CURKERNELS_BACKEND forces one."""
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto' "
                         f"(argument or {ENV_BACKEND}), got {backend!r}")
    return backend


def _graph_mode() -> bool:
    return torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()


def _fused_decode_backend(device: torch.device) -> str | None:
    for backend in ("cuda", "triton"):
        if unavailable_reason(backend, device) is None:
            return backend
    return None


def _graph_decode_winner(x: torch.Tensor, num_rows: int) -> str | None:
    if not GRAPH_DECODE_WINNERS:
        return None
    winners = GRAPH_DECODE_WINNERS.get(torch.cuda.get_device_name(x.device), {})
    for (dtype, max_rows), backend in sorted(winners.items(), key=lambda item: item[0][1]):
        if dtype == x.dtype and num_rows <= max_rows:
            return backend if unavailable_reason(backend, x.device) is None else None
    return None


def choose_backend(backend: str, x: torch.Tensor, num_rows: int) -> str:
    """A named backend runs or raises; 'auto' picks from the table above."""
    backend = requested_backend(backend)
    if backend != "auto":
        reason = unavailable_reason(backend, x.device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
        return backend
    if x.device.type != "cuda" or num_rows > DECODE_MAX_ROWS:
        return "torch"
    if _graph_mode():
        return _graph_decode_winner(x, num_rows) or "torch"
    return _fused_decode_backend(x.device) or "torch"
