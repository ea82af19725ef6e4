"""Run one `cur_linear` call on the backend dispatch picks for it.

This is the eager per-call path, so it is written for host time: the choice is memoized under
dispatch.choice_key, built from the tensors of this very call (a replaced, moved or recast
factor makes another key, never a stale hit). A call then costs the key, one dictionary lookup
and the backend's own launch.
"""

import functools
import math
from collections.abc import Callable

import torch

from . import dispatch
from .backends import CONTIGUOUS_INPUT_BACKENDS, backend_function
from .dispatch import choice_key, choose_backend, requested_backend
from .validation import check_input

# key -> (backend function, whether it takes only a contiguous input, and what to run
# before it: None, or the reservation of a CUDA-graph workspace, see `_graph_reservation`)
_choices: dict[tuple, tuple[Callable, bool, Callable | None]] = {}


def resolve_backend(backend: str, x: torch.Tensor, num_rows: int,
                    shape: tuple[int, int, int], linked: bool) -> str:
    """The dispatch choice, with float64 kept on the only backend that computes in it.

    `shape` is the layer's (m, n, r); `linked` says a U stage remains."""
    chosen = choose_backend(backend, x, num_rows, shape, linked)
    if x.dtype == torch.float64 and chosen != "torch":
        if requested_backend(backend) != "auto":
            raise TypeError(f"backend {chosen!r} does not compute in float64; use "
                            f"backend='torch' or a float32/float16/bfloat16 input")
        return "torch"
    return chosen


def _graph_reservation(backend: str, x: torch.Tensor, num_rows: int,
                       shape: tuple[int, int, int], linked: bool,
                       chosen: str) -> Callable | None:
    """For an eager decode call of a layer that CUDA graphs would run on the fused Triton kernel:
    reserving that kernel's workspace on every eager call's stream (a dictionary lookup once it
    exists) means torch.compile's warm-up, which runs eagerly on its capture stream, leaves the
    capture a kept workspace instead of a temporary that each replay zeroes again."""
    if (not x.is_cuda or chosen == "triton" or num_rows > dispatch.FUSED_MAX_ROWS
            or requested_backend(backend) != "auto" or dispatch.graph_mode()
            or dispatch.graph_decode_backend(x, num_rows, shape, linked) != "triton"):
        return None
    from .triton_backend import reserve_decode_workspace
    return functools.partial(reserve_decode_workspace, x.device, shape[2], shape[2], num_rows)


def run_cur_linear(x: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None, R: torch.Tensor,
                   bias: torch.Tensor | None, rows: torch.Tensor | None,
                   backend: str) -> torch.Tensor:
    """Check x against the factors (a kernel must never read past it), dispatch and run; x
    keeps its leading dimensions, and is made contiguous for the backends that need it."""
    x_shape, device, dtype = x.shape, x.device, x.dtype
    if not x_shape or x_shape[-1] != R.shape[1] or dtype != C.dtype or device != C.device:
        check_input(x, C, R)
    num_rows = x_shape[0] if len(x_shape) == 2 else math.prod(x_shape[:-1])
    n, m = x_shape[-1], C.shape[0]
    r = (R if rows is None else rows).shape[0]
    key = choice_key(backend, x, device, dtype, num_rows, m, n, r, U is not None)
    choice = _choices.get(key)
    if choice is None:
        # A named backend that cannot run raises here, and nothing is memoized: it raises again
        # on the next call.
        chosen = resolve_backend(backend, x, num_rows, (m, n, r), U is not None)
        choice = _choices[key] = (
            backend_function(chosen), chosen in CONTIGUOUS_INPUT_BACKENDS,
            _graph_reservation(backend, x, num_rows, (m, n, r), U is not None, chosen))
    function, contiguous_only, before = choice
    if before is not None:
        before()
    if contiguous_only and not x.is_contiguous():
        x = x.contiguous()
    return function(x, C, U, R, bias, rows)
