"""Sibling projections of one input from one stacked shrink weight, all outputs at once.

`shared_group(x, weight, expands, biases)` returns [(x·weightᵀ)[..., cols_i]·expands[i]ᵀ + b_i]
for the members of a group (curkernels.nn.share_input_shrinks), member i's columns being the
next expands[i].shape[1] of the product. Two ways to compute it:
- 'triton': the group decode kernel, one launch for the whole group (triton_group.py), for
  decode rows (at most FUSED_MAX_ROWS) on a GPU;
- 'torch': the shared cuBLAS chain, one GEMM over the stacked weight and one per member.
'auto' takes the Triton kernel where the GPU's measured group table (group_table.py) has it
win, in graphs and eagerly alike, as `cur_linear`'s dispatch takes a fused kernel only where
it was measured faster; CURKERNELS_BACKEND=triton asks for it (and raises where it cannot run);
any other backend named there keeps the chain.

`torch.ops.curkernels.shared_group` is the same as a custom op, opaque to torch.compile, so that
a compiled decode step keeps one launch a group.
"""

import math
import typing

import torch
import torch.nn.functional as F

from . import group_table
from .backends import unavailable_reason
from .dispatch import FUSED_MAX_ROWS, backend_environment, graph_mode, requested_backend
from .errors import BackendUnavailableError

MAX_MEMBERS = 3  # the group kernel's expand takes up to three members' factors


# (CURKERNELS_BACKEND as set, device, dtype, rows (prefill as one), graph, n, members' (m, r),
# uniform bias) -> the way
_choices: dict[tuple, str] = {}


def group_backend(x: torch.Tensor, num_rows: int, members: tuple[tuple[int, int], ...],
                  graph: bool, uniform_bias: bool = True) -> str:
    """'triton' (one group launch) or 'torch' (the shared chain) for this input and a group
    whose members have (outputs, rank) `members` (the kernel takes 2 or 3, every bias or
    none), inside a CUDA graph or compile (`graph`) or eagerly. Memoized: it is asked on every
    eager decode call of a group."""
    key = (backend_environment(), x.device, x.dtype, min(num_rows, FUSED_MAX_ROWS + 1), graph,
           x.shape[-1], members, uniform_bias)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _group_backend(x, num_rows, members, graph, uniform_bias)
    return choice


def _group_backend(x: torch.Tensor, num_rows: int, members: tuple[tuple[int, int], ...],
                   graph: bool, uniform_bias: bool) -> str:
    requested = requested_backend("auto")
    if requested not in ("auto", "triton"):
        return "torch"
    reason = unavailable_reason("triton", x.device)
    if requested == "triton" and reason is not None:
        raise BackendUnavailableError(f"backend 'triton' is unavailable: {reason}")
    fits = (0 < num_rows <= FUSED_MAX_ROWS and x.shape[-1] > 0 and uniform_bias
            and 2 <= len(members) <= MAX_MEMBERS and x.dtype != torch.float64)
    if reason is not None or not fits:
        return "torch"
    if requested == "triton":  # named: wherever it runs, the interpreter on a CPU included
        return "triton"
    # 'auto' keeps CPU inputs on the chain, as cur_linear's dispatch does
    wins = x.is_cuda and group_table.group_kernel_wins(
        torch.cuda.get_device_name(x.device), x.dtype, num_rows, x.shape[-1], members,
        "graph" if graph else "eager")
    return "triton" if wins else "torch"


def shared_group(x: torch.Tensor, weight: torch.Tensor, expands: list[torch.Tensor],
                 biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Every member's output (see the module docstring); the caller has checked x against
    the factors."""
    num_rows = math.prod(x.shape[:-1])
    uniform_bias = len({bias is None for bias in biases}) == 1
    members = tuple((C.shape[0], C.shape[1]) for C in expands)
    if group_backend(x, num_rows, members, x.is_cuda and graph_mode(),
                     uniform_bias) == "triton":
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


# typing.List, not list: torch 2.5's schema inference knows only typing's generics
@torch.library.custom_op("curkernels::shared_group", mutates_args=())
def shared_group_op(x: torch.Tensor, weight: torch.Tensor,
                    expands: typing.List[torch.Tensor],  # noqa: UP006
                    biases: typing.List[torch.Tensor | None],  # noqa: UP006
                    ) -> typing.List[torch.Tensor]:  # noqa: UP006
    # The way is chosen here, when the op runs, not while torch.compile traces.
    return shared_group(x, weight, expands, biases)


@shared_group_op.register_fake
def _(x, weight, expands, biases):
    return [x.new_empty((*x.shape[:-1], C.shape[0])) for C in expands]
