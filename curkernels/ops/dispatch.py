"""Picks the backend of every call (one `cur_linear`, a sibling group) and memoizes the choice.

Backends: 'torch' (the cuBLAS chain, torch_chain.py) always runs; 'triton' needs the triton
package and a CUDA tensor (or the interpreter, TRITON_INTERPRET=1, on CPU tensors); 'cuda' needs
the compiled extension `curkernels._C`. A named backend (argument or CURKERNELS_BACKEND) runs or
raises; it never falls back. 'auto' follows the rules below, by device, execution mode (eager or
inside a CUDA graph being captured: torch.cuda.graph, torch.compile's "reduce-overhead"; the op
decides when it runs, never while torch.compile traces), M (the input rows), the layer's shape
and dtype. Every choice of a fused kernel rests on a measurement (bench/results/<gpu>.md: bf16,
cold weights, U folded; the GPU's measured tables, tables.py); elsewhere the cuBLAS chain runs.

Single layer:
- Eager decode: host time per launch dominates. The fastest fused kernel among those whose
  eager time the GPU's table puts at most 0.9× chain2's: the CUDA extension (one C++ op
  launch), or the Triton kernel, whose launches skip Triton's per-call argument binding
  (triton/launch.py; the shipped tables timed it before that, at 37–80 µs a call). Where no
  table covers the call, the rules measured on the first H100 run apply: the extension took
  13.7–34.7 µs a call where chain2 took 45–58 µs at M ≤ 4 on every Llama-3.1-8B shape and
  r ≤ 1024; at M = 16 it lost at r = 1024 on the 14336-wide shapes (77–89 vs 54–58 µs) and
  won on the 4096-wide ones (44–49 vs 53–54 µs), so M > 4 needs r ≤ 512 or both sides
  ≤ 4096. Those rules were measured at M ≤ EAGER_RULES_MAX_ROWS and do not extend past it.
- Decode inside a CUDA graph: the fused kernel the GPU's table says beat chain2 by
  graph-replay time, else chain2. On the H100 the Triton kernel won (0.69–0.87× chain2's
  time) up to r = 512 with at most 4096 output rows, and tied or lost at r ≥ 1024 or with
  14336 output rows. The CUDA kernel never beat chain2 in graphs on the H100; on the H200 it
  did at 3 points, where the Triton kernel was faster still. A layer with a U stage left was
  not measured in graphs: chain.
- Batched decode (EAGER_RULES_MAX_ROWS < M ≤ DECODE_MAX_ROWS): a fused kernel only where the
  GPU's table has a point at that many rows or more (the Triton decode kernel takes up to 64
  rows in one launch, the CUDA extension runs launches of 16); else the chain.
- Prefill (M > DECODE_MAX_ROWS): the fused prefill kernel was 3–26× slower than chain2: chain.
- float64 runs on 'torch' only (an 'auto' call is kept there; a named fused backend raises).

Sibling group (q/k/v or gate/up sharing one stacked shrink weight, curkernels.nn.shared_shrink):
'triton' (the group decode kernel, one launch for the whole group, decode rows on a GPU) where
the GPU's measured group table has it win, in graphs and eagerly alike; else 'torch' (the shared
cuBLAS chain). CURKERNELS_BACKEND=triton asks for the kernel (and raises where Triton cannot
run); any other backend named there keeps the chain. An eager decode call of a member takes the
group's shared path only past EAGER_RULES_MAX_ROWS rows, inside a capture, or where the group
kernel runs; otherwise each member runs its own `cur_linear` (one fused launch a member, where
the shared chain would take one more).

Choices are memoized under everything they read that can change from one call to the next (for
a layer: the requested backend, device, dtype, M up to DECODE_MAX_ROWS, capture, shape, link).
Which backends can run is fixed per process, and the environment is read once (settings.py):
`settings.reload()` reads it again and empties the memos. A memoized Triton decode choice of a
two-factor layer or group holds its rank's reserved workspaces (triton/workspace.py), which
`prepare_for_inference` makes ahead (`reserve_decode_workspaces`).
"""

import functools
import importlib
from collections.abc import Callable

import torch

from . import settings, tables
from .backend_error import BackendUnavailableError
from .tables import DECODE_MAX_ROWS, MAX_GROUP_MEMBERS
from .torch_chain import cur_linear_torch, shared_chain

BACKENDS = ("torch", "triton", "cuda")
CONTIGUOUS_INPUT_BACKENDS = ("triton",)  # the others take any strides
# The first H100 run's decode sizes, where its eager rules hold.
EAGER_RULES_MAX_ROWS = 16
EAGER_CUDA_ALWAYS_ROWS = 4
EAGER_CUDA_MAX_RANK = 512
EAGER_CUDA_MAX_SIDE = 4096
# (module, function) of each optional backend: imported once it is known to run here
_BACKEND_FUNCTIONS = {"triton": ("curkernels.ops.triton.backend", "cur_linear_triton"),
                      "cuda": ("curkernels.ops.cuda", "cur_linear_cuda")}
_TRITON_DECODE = "curkernels.ops.triton.decode"
_TRITON_WORKSPACE = "curkernels.ops.triton.workspace"

# Whether the current CUDA stream is capturing a graph: the C function that
# torch.cuda.is_current_stream_capturing wraps (one Python frame less on every eager call).
stream_capturing: Callable[[], bool] = getattr(torch._C, "_cuda_isCurrentStreamCapturing",
                                               lambda: False)

# (backend, device, dtype, rows (DECODE_MAX_ROWS + 1 for prefill), capturing, m, n, r, linked)
# -> (backend function, whether it takes only a contiguous input, what to run before it)
choices: dict[tuple, tuple[Callable, bool, Callable | None]] = {}
# (device, dtype, rows (prefill as one), capturing, n, members' (m, r), uniform bias)
# -> (way, function)
group_choices: dict[tuple, tuple[str, Callable]] = {}


@settings.on_reload
def _forget() -> None:
    choices.clear()
    group_choices.clear()


@functools.cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure makes the backend unavailable, with its reason
        return f"{type(exc).__name__}: {exc}"
    return None


def _function(module_and_name: tuple[str, str]) -> Callable:
    module, name = module_and_name
    return getattr(importlib.import_module(module), name)


def extension_status() -> tuple[bool, str]:
    """Whether curkernels._C imports, with the reason when it does not."""
    error = _import_error("curkernels._C")
    if error is None:
        return True, "curkernels._C imported"
    if "No module named 'curkernels._C'" in error:
        return False, ("curkernels._C was not built (no nvcc or a CPU build of torch at install "
                       "time, or CURKERNELS_SKIP_CUDA_BUILD=1); reinstall with a CUDA toolkit")
    return False, f"curkernels._C failed to import: {error}"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on tensors of `device`, else why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        error = _import_error("triton")
        if error is not None:
            return f"triton is not importable ({error})"
        if device.type == "cuda" or (device.type == "cpu" and settings.current.triton_interpret):
            return None
        return (f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                f"the input is on {device}")
    if backend == "cuda":
        built, why = extension_status()
        if not built:
            return why
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors; the input is on {device}"
        return None
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


def backend_function(backend: str) -> Callable:
    """`backend`'s function `(x, C, U, R, bias, rows) -> y`, x (..., n) and y (..., m) as
    `F.linear` takes and gives them (flattening x around a call would cost host time)."""
    if backend == "torch":
        return cur_linear_torch
    if backend not in _BACKEND_FUNCTIONS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
    return _function(_BACKEND_FUNCTIONS[backend])


def requested_backend(backend: str) -> str:
    """The argument, unless it is 'auto' and CURKERNELS_BACKEND forces one."""
    if backend == "auto":
        backend = settings.current.backend
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto' "
                         f"(argument or {settings.ENV_BACKEND}), got {backend!r}")
    return backend


def _measured_backend(device: torch.device, dtype: torch.dtype, num_rows: int,
                      shape: tuple[int, int, int], mode: str) -> str | None:
    """The fastest fused kernel that can run among those the GPU's table says beat chain2 where
    this call falls ('torch' when none did or none can run), or None when no table covers it."""
    if all(unavailable_reason(fused, device) is not None for fused in tables.FUSED_VARIANTS):
        return "torch"
    winners = tables.decode_winners(torch.cuda.get_device_name(device), dtype, num_rows, shape,
                                    DECODE_MAX_ROWS, mode)
    if winners is None:
        return None
    return next((fused for fused in winners if unavailable_reason(fused, device) is None),
                "torch")


def _eager_decode_backend(device: torch.device, dtype: torch.dtype, num_rows: int,
                          shape: tuple[int, int, int]) -> str:
    measured = _measured_backend(device, dtype, num_rows, shape, "eager")
    if measured is not None:
        return measured
    if num_rows > EAGER_RULES_MAX_ROWS or unavailable_reason("cuda", device) is not None:
        return "torch"
    if num_rows <= EAGER_CUDA_ALWAYS_ROWS or shape[2] <= EAGER_CUDA_MAX_RANK \
            or max(shape[0], shape[1]) <= EAGER_CUDA_MAX_SIDE:
        return "cuda"
    return "torch"


def _graph_decode_backend(device: torch.device, dtype: torch.dtype, num_rows: int,
                          shape: tuple[int, int, int], linked: bool) -> str:
    if linked:
        return "torch"
    return _measured_backend(device, dtype, num_rows, shape, "graph") or "torch"


def single_backend(backend: str, device: torch.device, dtype: torch.dtype, num_rows: int,
                   shape: tuple[int, int, int], linked: bool, capturing: bool) -> str:
    """The backend of one `cur_linear` call of M = `num_rows` rows through a layer of `shape`
    (m, n, r), `linked` when a U stage remains (not folded), inside a CUDA graph capture or not
    (see the module docstring). A named backend that cannot run raises
    BackendUnavailableError; float64 on a named fused backend raises TypeError."""
    requested = requested_backend(backend)
    if requested != "auto":
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested!r} is unavailable: {reason}")
        chosen = requested
    elif device.type != "cuda" or num_rows > DECODE_MAX_ROWS:
        chosen = "torch"
    elif capturing:
        chosen = _graph_decode_backend(device, dtype, num_rows, shape, linked)
    else:
        chosen = _eager_decode_backend(device, dtype, num_rows, shape)
    if dtype == torch.float64 and chosen != "torch":
        if requested != "auto":
            raise TypeError(f"backend {chosen!r} does not compute in float64; use "
                            f"backend='torch' or a float32/float16/bfloat16 input")
        return "torch"
    return chosen


def _reserved_workspaces(device: torch.device, r: int):
    """The Triton decode workspaces kept for a two-factor layer (or group) of rank r on device,
    which a memoized choice holds: its calls then find their workspace by a list index
    (triton/workspace.py)."""
    return _function((_TRITON_WORKSPACE, "reserved_workspaces"))(device, r, r)


def _graph_reservation(backend: str, device: torch.device, dtype: torch.dtype, num_rows: int,
                       shape: tuple[int, int, int], linked: bool, capturing: bool,
                       chosen: str) -> Callable | None:
    """For an eager decode call of a layer that CUDA graphs would run on the fused Triton kernel:
    reserving that kernel's workspace on every eager call's stream (a list index on the stream
    the reservation serves, a keyed lookup on another) means torch.compile's warm-up, which
    runs eagerly on its capture stream, leaves the capture a kept workspace instead of a
    temporary that each replay zeroes again."""
    if (device.type != "cuda" or capturing or chosen == "triton" or num_rows > DECODE_MAX_ROWS
            or requested_backend(backend) != "auto"
            or _graph_decode_backend(device, dtype, num_rows, shape, linked) != "triton"):
        return None
    block_rows = _function((_TRITON_DECODE, "decode_block_rows"))(num_rows)
    return functools.partial(_reserved_workspaces(device, shape[2]).get, num_rows, block_rows)


def resolve(key: tuple) -> tuple[Callable, bool, Callable | None]:
    """The choice for a `choices` key (its layout above), memoized there. A named backend that
    cannot run raises, and nothing is memoized: it raises again on the next call. A Triton
    decode choice of a two-factor layer holds the layer's reserved workspaces."""
    backend, device, dtype, num_rows, capturing, m, n, r, linked = key
    shape = (m, n, r)
    chosen = single_backend(backend, device, dtype, num_rows, shape, linked, capturing)
    function = backend_function(chosen)
    if chosen == "triton" and num_rows <= DECODE_MAX_ROWS and not linked:
        function = functools.partial(function, workspaces=_reserved_workspaces(device, r))
    choice = choices[key] = (
        function, chosen in CONTIGUOUS_INPUT_BACKENDS,
        _graph_reservation(backend, device, dtype, num_rows, shape, linked, capturing, chosen))
    return choice


def reserve_decode_workspaces(backend: str, device: torch.device, r: int) -> bool:
    """For `prepare_for_inference`: where the Triton decode kernel may run a two-factor layer
    (or sibling group) of rank r with `backend` on `device` ('auto': CUDA tensors, eagerly or
    in CUDA graphs; 'triton'), makes its workspaces of every row block now, on the current
    stream, which the memoized choices then hand to the kernel. Returns whether it did."""
    requested = requested_backend(backend)
    if requested not in ("auto", "triton") or unavailable_reason("triton", device) is not None:
        return False
    if requested == "auto" and device.type != "cuda":  # 'auto' keeps CPU inputs on the chain
        return False
    _function((_TRITON_DECODE, "reserve_decode_workspaces"))(device, r, r)
    return True


def group_backend(device: torch.device, dtype: torch.dtype, num_rows: int, n: int,
                  members: tuple[tuple[int, int], ...], capturing: bool,
                  uniform_bias: bool = True) -> str:
    """'triton' (one group launch) or 'torch' (the shared chain) for M = `num_rows` rows of n
    features into a group whose members have (outputs, rank) `members` (the kernel takes 2 or
    3, every bias or none), inside a CUDA graph capture or eagerly."""
    requested = requested_backend("auto")
    if requested not in ("auto", "triton"):
        return "torch"
    reason = unavailable_reason("triton", device)
    if requested == "triton" and reason is not None:
        raise BackendUnavailableError(f"backend 'triton' is unavailable: {reason}")
    fits = (0 < num_rows <= DECODE_MAX_ROWS and n > 0 and uniform_bias
            and 2 <= len(members) <= MAX_GROUP_MEMBERS and dtype != torch.float64)
    if reason is not None or not fits:
        return "torch"
    if requested == "triton":  # named: wherever it runs, the interpreter on a CPU included
        return "triton"
    # 'auto' keeps CPU inputs on the chain, as a single layer's dispatch does
    wins = device.type == "cuda" and tables.group_kernel_wins(
        torch.cuda.get_device_name(device), dtype, num_rows, n, members,
        "graph" if capturing else "eager")
    return "triton" if wins else "torch"


def group_choice(x: torch.Tensor, num_rows: int, members: tuple[tuple[int, int], ...],
                 capturing: bool, uniform_bias: bool = True) -> tuple[str, Callable]:
    """The way a group's call runs and its function `(x, weight, expands, biases) -> outputs`;
    memoized: it is asked on every eager decode call of a group."""
    key = (x.device, x.dtype, min(num_rows, DECODE_MAX_ROWS + 1), capturing, x.shape[-1],
           members, uniform_bias)
    choice = group_choices.get(key)
    if choice is None:
        way = group_backend(x.device, x.dtype, num_rows, x.shape[-1], members, capturing,
                            uniform_bias)
        function = shared_chain
        if way == "triton":
            function = functools.partial(
                _function((_TRITON_DECODE, "cur_linear_group_triton")),
                workspaces=_reserved_workspaces(x.device, sum(rank for _, rank in members)))
        choice = group_choices[key] = (way, function)
    return choice


def group_serves(x: torch.Tensor, num_rows: int, members: tuple[tuple[int, int], ...]) -> bool:
    """Whether an eager call of a group member on the CUDA tensor x takes the group's shared
    path (else the member's own `cur_linear`; see the module docstring)."""
    if num_rows > EAGER_RULES_MAX_ROWS or stream_capturing():
        return True
    return group_choice(x, num_rows, members, False)[0] == "triton"
