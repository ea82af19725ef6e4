"""One shrink for sibling projections that read the same input.

The q, k and v projections of an attention block, and gate and up of a gated MLP, each compute
x·Rᵀ on one x. `share_input_shrinks` stacks their shrink factors (each `CURLinear`'s R) into
one weight, so that the group reads it in one pass: at decode on a GPU whose measured group
table has it win (ops/tables.py), one Triton launch computes every member's output (the shrink
over the stacked weight, then each member's expand, ops/triton/decode.py), where the members
alone take a launch each; elsewhere one GEMM over the stacked weight and one expand GEMM a
member (the shared cuBLAS chain), a wider and better-filled GEMM at prefill. Every member's
shrink factor becomes a view of its rows of the stacked weight, so nothing is stored twice and
state dicts keep their keys and shapes.

The shared path runs under torch.compile (as the opaque op `curkernels::shared_group`, one
node a group) and CUDA-graph capture, for prefill and on the CPU, and for eager decode on a GPU
where the group kernel runs (ops/dispatch.py); elsewhere (no measurement of the group
kernel winning, no Triton, or CURKERNELS_BACKEND naming another backend) eager decode keeps
each member's own dispatch, one fused launch a member where the shared chain would take one
more.

The first member called with an input computes every member's output and keeps them for the
others, matched by the identity of the input (and, eagerly, by its version counter, so an
input changed in place is not matched); the last member of the group to be served drops them.
Nothing outlives a forward, and a compiled graph (torch.compile traces the hand-over) takes no
extra inputs or guards. A member called with another input recomputes them: a wrong grouping
costs time, never correctness.
"""

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..ops.dispatch import group_serves, requested_backend
from ..ops.op import check_input, shared_group, shared_group_op
from ..ops.torch_chain import shared_chain
from .cur_linear import CURLinear

# transformers' names of the projections that read one input: Llama, Mistral, Qwen2 and most
# decoder-only models; BERT-style encoders
DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                  ("query", "key", "value"))


class SharedShrink:
    """The stacked shrink weight of a group and the outputs it hands from member to member.
    A plain object, not a module: the weight's storage belongs to the members' parameters."""

    def __init__(self, weight: torch.Tensor, members: Sequence[nn.Module]):
        self.weight = weight
        self.members = tuple(members)
        # (outputs, rank) of each member, as the group dispatch reads them
        self.shapes = tuple(tuple(member._parameters["C"].shape) for member in self.members)
        # (input, its version, outputs), replaced whole and read once a call: threads running
        # the model at once may recompute the outputs, but never take another input's
        self._handed: tuple | None = None
        self._served = 0

    def serves(self, x: torch.Tensor) -> bool:
        """Whether a member's call on `x` runs the shared path (see the module docstring);
        a call it does not serve goes through the member's own `cur_linear`, whose checks then
        name whatever is wrong with `x`."""
        if torch.compiler.is_compiling():
            return True
        handed = self._handed
        if handed is not None and handed[0] is x:  # a sibling's call on x was served
            return True
        if not isinstance(x, torch.Tensor) or not x.dim():
            return False
        if not x.is_cuda:
            return True
        return group_serves(x, math.prod(x.shape[:-1]), self.shapes)

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output on x, computed once for the members that read this very x."""
        compiling = torch.compiler.is_compiling()
        handed = self._handed
        if (handed is None or handed[0] is not x
                or (not compiling and handed[1] != x._version)):  # compile cannot read it
            if self.weight.device != x.device or self.weight.dtype != x.dtype:
                raise RuntimeError(
                    f"the shared shrink weight is {self.weight.dtype} on {self.weight.device}, "
                    f"the model's factors {x.dtype} on {x.device}: moving or casting a model "
                    f"copies each factor apart from it; call share_input_shrinks afterwards")
            handed = (x, None if compiling else x._version, self._compute(x, compiling))
            self._handed, self._served = handed, 0
        self._served += 1
        if self._served >= len(self.members):
            self._handed = None
        return handed[2]

    def _compute(self, x: torch.Tensor, compiling: bool) -> list[torch.Tensor]:
        expands = [m._parameters["C"] for m in self.members]
        biases = [m._parameters.get("bias") for m in self.members]
        if torch.is_grad_enabled() and (x.requires_grad or any(
                factor.requires_grad for factor in (*expands, *biases) if factor is not None)):
            return shared_chain(x, self.weight, expands, biases)  # torch ops: differentiable
        if compiling:
            return shared_group_op(x, self.weight, expands, biases)
        return shared_group(x, self.weight, expands, biases)

    def forward_member(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The member's output, from the group's outputs on x."""
        params = module._parameters
        expand = params["C"]
        if (not isinstance(x, torch.Tensor) or not x.dim() or x.shape[-1] != module.in_features
                or x.dtype != expand.dtype or x.device != expand.device):
            check_input(x, expand, params["R"])
        return self.outputs(x)[module.shared_index]


def _shareable(name: str, module: nn.Module | None) -> bool:
    """Two factors, the shrink factor read in place, the backend left to dispatch; a factor
    that still trains is an error, not a module to skip."""
    if not isinstance(module, CURLinear):
        return False
    if module.R.requires_grad:
        raise ValueError(f"{name}.R requires grad: shared shrinks are for frozen models "
                         f"(call prepare_for_inference first)")
    return module.U is None and not module.gather and requested_backend(module.backend) == "auto"


def _share(members: list[nn.Module], factors: list[torch.Tensor]) -> SharedShrink:
    with torch.no_grad():
        stacked = torch.cat([factor.detach() for factor in factors]).contiguous()
    shared = SharedShrink(stacked, members)
    start = 0
    for index, (member, factor) in enumerate(zip(members, factors, strict=True)):
        stop = start + factor.shape[0]
        member.R = nn.Parameter(stacked[start:stop], requires_grad=False)
        member.shared_index = index
        member.shared_shrink = shared
        start = stop
    return shared


def share_input_shrinks(model: nn.Module,
                        groups: Iterable[Iterable[str]] = DEFAULT_GROUPS) -> int:
    """Make the factored siblings of each group, children of one module, share one shrink
    GEMM, in place (see the module docstring); returns how many groups were formed.

    A member must be a two-factor `CURLinear` (no U, or U folded by `prepare_for_inference`;
    not in the gather form) with backend='auto': its calls then run the
    group's shared path instead of `cur_linear`'s dispatch (see the module docstring). Members
    of a group must share in_features, dtype and device; a group needs two. For inference
    only: a member's shrink factor becomes a view of the stacked weight, which the shared
    path reads, so a factor that requires grad raises ValueError. Moving or casting the model
    afterwards copies each factor apart from the stacked weight: call this again then (it
    stacks them anew).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    groups = [tuple(names) for names in groups]
    formed = 0
    for prefix, parent in list(model.named_modules()):
        for names in groups:
            members = [parent._modules[name] for name in names
                       if _shareable(f"{prefix}.{name}".lstrip("."), parent._modules.get(name))]
            if len(members) < 2:
                continue
            factors = [member._parameters["R"] for member in members]
            if len({(f.shape[1], f.dtype, f.device) for f in factors}) != 1:
                continue
            _share(members, factors)
            formed += 1
    return formed
