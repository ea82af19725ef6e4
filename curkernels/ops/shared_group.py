"""Sibling projections of one input from one stacked shrink weight, all outputs at once.

`shared_group(x, weight, expands, biases)` returns [(x·weightᵀ)[..., cols_i]·expands[i]ᵀ + b_i]
for the members of a group (curkernels.nn.share_input_shrinks), member i's columns being the
next expands[i].shape[1] of the product. Two ways to compute it:
- 'triton': the group decode kernel, one launch for the whole group (triton_group.py), for
  decode rows (at most FUSED_MAX_ROWS) on a GPU;
- 'torch': the shared cuBLAS chain, one GEMM over the stacked weight and one per member.
'auto' takes the Triton kernel wherever it can run, CURKERNELS_BACKEND=triton asks for it (and
raises where it cannot run), any other backend named there keeps the chain. Not from a measured
table, unlike `cur_linear`'s dispatch: sharing is opt-in, and bench/e2e.py --shared-shrinks
times it against the unshared model.

`torch.ops.curkernels.shared_group` is the same as a custom op, opaque to torch.compile, so that
a compiled decode step keeps one launch a group.
"""

import math

import torch
import torch.nn.functional as F

from .backends import unavailable_reason
from .dispatch import FUSED_MAX_ROWS, backend_environment, requested_backend
from .errors import BackendUnavailableError

MAX_MEMBERS = 3  # the group kernel's expand takes up to three members' factors


# (CURKERNELS_BACKEND as set, device, dtype, whether the call fits the kernel) -> the way
_choices: dict[tuple, str] = {}


def group_backend(x: torch.Tensor, num_rows: int, members: int,
                  uniform_bias: bool = True) -> str:
    """'triton' (one group launch) or 'torch' (the shared chain) for this input and a group
    of `members` (the kernel takes 2 or 3, every bias or none). Memoized: it is asked on
    every eager decode call of a member."""
    fits = (0 < num_rows <= FUSED_MAX_ROWS and x.shape[-1] > 0 and uniform_bias
            and 2 <= members <= MAX_MEMBERS)
    key = (backend_environment(), x.device, x.dtype, fits)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _group_backend(x, fits)
    return choice


def _group_backend(x: torch.Tensor, fits: bool) -> str:
    requested = requested_backend("auto")
    if requested not in ("auto", "triton"):
        return "torch"
    reason = unavailable_reason("triton", x.device)
    if requested == "triton" and reason is not None:
        raise BackendUnavailableError(f"backend 'triton' is unavailable: {reason}")
    # 'auto' keeps CPU inputs on the chain, as cur_linear's dispatch does (the interpreter
    # runs Triton on them only when asked for by name)
    runs = reason is None and (x.is_cuda or requested == "triton")
    return "triton" if runs and fits and x.dtype != torch.float64 else "torch"


def shared_group(x: torch.Tensor, weight: torch.Tensor, expands: list[torch.Tensor],
                 biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Every member's output (see the module docstring); the caller has checked x against
    the factors."""
    num_rows = math.prod(x.shape[:-1])
    uniform_bias = len({bias is None for bias in biases}) == 1
    if group_backend(x, num_rows, len(expands), uniform_bias) == "triton":
        from .triton_group import cur_linear_group_decode
        x = x.contiguous()
        outputs = [x.new_empty((*x.shape[:-1], C.shape[0])) for C in expands]
        cur_linear_group_decode(x, weight, expands, biases, outputs)
        return outputs
    return shared_chain(x, weight, expands, biases)


def shared_chain(x: torch.Tensor, weight: torch.Tensor, expands: list[torch.Tensor],
                 biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The shared cuBLAS chain, in torch ops (differentiable)."""
    product = F.linear(x, weight)
    outputs, start = [], 0
    for C, bias in zip(expands, biases, strict=True):
        stop = start + C.shape[1]
        outputs.append(F.linear(product[..., start:stop], C, bias))
        start = stop
    return outputs


@torch.library.custom_op("curkernels::shared_group", mutates_args=())
def shared_group_op(x: torch.Tensor, weight: torch.Tensor, expands: list[torch.Tensor],
                    biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    # The way is chosen here, when the op runs, not while torch.compile traces.
    return shared_group(x, weight, expands, biases)


@shared_group_op.register_fake
def _(x, weight, expands, biases):
    return [x.new_empty((*x.shape[:-1], C.shape[0])) for C in expands]
