"""Choose the backend of one `cur_linear` call.

A named backend (argument or CURKERNELS_BACKEND) runs or raises; it never falls back. 'auto'
follows an explicit table, by device, execution mode (eager or CUDA graph / compile), M, the
layer's shape and dtype. Every choice of a fused kernel rests on a measurement
(bench/results/<gpu>.md: bf16, cold weights, U folded); elsewhere the cuBLAS chain (the torch
backend) is kept. Both decode rules read the GPU's own measured table (decode_table.py) where
one covers the call.

- Eager decode: host time per launch dominates. The fastest fused kernel among those whose
  eager time the GPU's table puts at most 0.9× chain2's: the CUDA extension (one C++ op
  launch), or the Triton kernel, whose launches skip Triton's per-call argument binding
  (triton_launch.py; the shipped tables timed it before that, at 37–80 µs a call). Where no
  table covers the call, the rules measured on the first H100 run apply: the extension took
  13.7–34.7 µs a call where chain2 took 45–58 µs at M ≤ 4 on every Llama-3.1-8B shape and
  r ≤ 1024; at M = 16 it lost at r = 1024 on the 14336-wide shapes (77–89 vs 54–58 µs) and
  won on the 4096-wide ones (44–49 vs 53–54 µs), so M > 4 needs r ≤ 512 or both sides
  ≤ 4096.
- Decode inside a CUDA graph being captured (torch.cuda.graph, torch.compile's
  "reduce-overhead" mode; the op resolves its backend when it runs): the fused kernel the
  GPU's table says beat chain2 by graph-replay time, else chain2. On the H100 the Triton
  kernel won (0.69–0.87× chain2's time) up to r = 512 with at most 4096 output rows, and tied
  or lost at r ≥ 1024 or with 14336 output rows. The CUDA kernel never beat chain2 in graphs
  on the H100; on the H200 it did at 3 points, where the Triton kernel was faster still.
- Batched decode (16 < M ≤ FUSED_MAX_ROWS): a fused kernel only where the GPU's table has a
  point at that many rows or more, by the same two rules (the Triton decode kernel takes up to
  64 rows in one launch, the CUDA extension runs launches of 16); else the cuBLAS chain. The
  first run's eager rules were measured at M ≤ 16 and do not extend past it.
- Prefill (M > FUSED_MAX_ROWS): the fused prefill kernel was 3–26× slower than chain2; cuBLAS
  chain.

The table is cheap to consult but not free (availability checks, the GPU's name): execute.py
memoizes each choice under `choice_key`, everything the choice reads that can change from one
call to the next. CURKERNELS_BACKEND is part of that key, so it is read on every call and a
change takes effect at the next call; CURKERNELS_DECODE_TABLE counts as it was at a key's
first call.
"""

import os

import torch

from . import decode_table
from .backends import BACKENDS, unavailable_reason
from .errors import BackendUnavailableError

ENV_BACKEND = "CURKERNELS_BACKEND"
DECODE_MAX_ROWS = 16  # the first H100 run's decode sizes, where its eager rules hold
FUSED_MAX_ROWS = 64  # the most rows a measured table may send to a fused kernel

EAGER_CUDA_ALWAYS_ROWS = 4
EAGER_CUDA_MAX_RANK = 512
EAGER_CUDA_MAX_SIDE = 4096


# os.environ.get costs about a microsecond a call (the key is encoded through the Mapping
# protocol); os.environ's own dict, under the key encoded once, answers in tens of nanoseconds.
_ENV_BACKEND_KEY = os.environ.encodekey(ENV_BACKEND)


def backend_environment() -> str | None:
    """CURKERNELS_BACKEND as set (raw: a memo key, not validated)."""
    try:
        return os.environ._data.get(_ENV_BACKEND_KEY)
    except AttributeError:  # os.environ replaced by a plain mapping
        return os.environ.get(ENV_BACKEND)


def choice_key(backend: str, x: torch.Tensor, device: torch.device, dtype: torch.dtype,
               num_rows: int, m: int, n: int, r: int, linked: bool) -> tuple:
    """Everything `choose_backend` reads that can change from one call to the next: the argument,
    CURKERNELS_BACKEND (raw), the input's device and dtype (passed in: the caller has read
    them), M (the table tells row counts apart only up to FUSED_MAX_ROWS), whether a CUDA graph
    is being captured (asked only for CUDA decode), and the layer's shape and link. Which
    backends can run is fixed per process: the extension and triton import once, and
    TRITON_INTERPRET, which Triton reads once when its kernels are defined, counts as it was at
    a key's first call. One flat tuple, built inline: this runs on every eager call."""
    environment = backend_environment()
    if num_rows > FUSED_MAX_ROWS:
        return (backend, environment, device, dtype, FUSED_MAX_ROWS + 1, False, m, n, r, linked)
    # x.is_cuda, not device.type: building the type's name string costs most of a microsecond.
    graph = x.is_cuda and graph_mode()
    return (backend, environment, device, dtype, num_rows, graph, m, n, r, linked)


def requested_backend(backend: str) -> str:
    """The argument, unless it is 'auto' and CURKERNELS_BACKEND forces one."""
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto' "
                         f"(argument or {ENV_BACKEND}), got {backend!r}")
    return backend


def graph_mode() -> bool:
    return torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()


def _measured_backend(x: torch.Tensor, num_rows: int, shape: tuple[int, int, int],
                      mode: str) -> str | None:
    """The fastest fused kernel that can run among those the GPU's table says beat chain2 where
    this call falls ('torch' when none did or none can run), or None when no table covers it."""
    if all(unavailable_reason(fused, x.device) is not None
           for fused in decode_table.FUSED_VARIANTS):
        return "torch"
    winners = decode_table.decode_winners(torch.cuda.get_device_name(x.device), x.dtype,
                                          num_rows, shape, FUSED_MAX_ROWS, mode)
    if winners is None:
        return None
    return next((fused for fused in winners if unavailable_reason(fused, x.device) is None),
                "torch")


def _eager_decode_backend(x: torch.Tensor, num_rows: int,
                          shape: tuple[int, int, int] | None) -> str:
    if shape is not None:
        measured = _measured_backend(x, num_rows, shape, "eager")
        if measured is not None:
            return measured
    if num_rows > DECODE_MAX_ROWS or unavailable_reason("cuda", x.device) is not None:
        return "torch"
    if num_rows <= EAGER_CUDA_ALWAYS_ROWS:
        return "cuda"
    if shape is not None and (shape[2] <= EAGER_CUDA_MAX_RANK
                              or max(shape[0], shape[1]) <= EAGER_CUDA_MAX_SIDE):
        return "cuda"
    return "torch"


def graph_decode_backend(x: torch.Tensor, num_rows: int, shape: tuple[int, int, int] | None,
                         linked: bool) -> str:
    """The backend of a decode call (num_rows ≤ FUSED_MAX_ROWS) inside a CUDA graph: the fused
    kernel the measured table says won, else the cuBLAS chain."""
    if shape is None or linked:
        return "torch"
    return _measured_backend(x, num_rows, shape, "graph") or "torch"


def choose_backend(backend: str, x: torch.Tensor, num_rows: int,
                   shape: tuple[int, int, int] | None = None, linked: bool = False) -> str:
    """A named backend runs or raises; 'auto' picks from the table above.

    `shape` is the layer's (m, n, r); `linked` says a U stage remains (not folded).
    """
    backend = requested_backend(backend)
    if backend != "auto":
        reason = unavailable_reason(backend, x.device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
        return backend
    if x.device.type != "cuda" or num_rows > FUSED_MAX_ROWS:
        return "torch"
    if graph_mode():
        return graph_decode_backend(x, num_rows, shape, linked)
    return _eager_decode_backend(x, num_rows, shape)
