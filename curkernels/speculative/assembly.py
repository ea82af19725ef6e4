"""Assemble a draft model whose tensors are the target's own, read in place.

The draft is the target's architecture built on the meta device with only the kept blocks;
every parameter and buffer is then the target's tensor (a new `nn.Parameter` on the same
storage, frozen), the factored Linears are `CURLinear`s in the gather form (R = the target's
weight, rows picked by `row_indices`) or, in a pair-wise draft, `NarrowLinear`s that read
their kept rows of the target's weight in place or compute with their own refit weight, and
the head may score a frequent-token subset. Only C, U, the refit weights, the indices and the
head's token ids belong to the draft. It is its own `nn.Module`, so
it keeps its own KV cache and runs anywhere the target runs (`generate(assistant_model=...)`).
"""

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..compress.layer_selection import block_list
from ..nn import CURLinear, NarrowLinear
from .head import FrequentTokenHead


@dataclass
class CURFactor:
    """What a draft adds for one factored Linear: R = W[rows] is the target's."""
    C: torch.Tensor
    U: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


@dataclass
class NarrowFactor:
    """What a pair-wise draft adds for one narrowed Linear: either kept rows (`rows`, read in
    place from the target's weight and bias; `weight` None) or a refit on kept inputs (`cols`,
    with the draft's own `weight` and `bias`)."""
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    scatter_rows: bool
    gather_cols: bool
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self):
        if (self.rows is None) == (self.cols is None):
            raise ValueError("a narrow draft factor keeps either rows (read in place) or "
                             "input columns (with its own refit weight), not both or neither")
        if (self.weight is None) != (self.cols is None):
            raise ValueError("a narrow draft factor has its own weight exactly when it keeps "
                             "input columns")


DraftFactor = CURFactor | NarrowFactor


@dataclass
class DraftSpec:
    """Everything that defines a draft beside the target's weights (saved by `save_draft`)."""
    method: str
    base_layers: list[int]  # the target block each draft block reads
    factors: dict[str, DraftFactor] = field(repr=False)  # keyed by the target's module name
    head_token_ids: torch.Tensor | None
    base: dict  # identity.base_identity of the target


@dataclass(frozen=True)
class BlockNames:
    """Module names in the draft and in the target: draft block i is target block layers[i]."""
    prefix: str
    layers: list[int]

    def _split(self, name: str) -> tuple[int, str] | None:
        if not name.startswith(self.prefix + "."):
            return None
        index, rest = name[len(self.prefix) + 1:].split(".", 1)
        return int(index), rest

    def in_target(self, draft_name: str) -> str:
        parts = self._split(draft_name)
        return draft_name if parts is None else f"{self.prefix}.{self.layers[parts[0]]}.{parts[1]}"

    def in_draft(self, target_name: str) -> str:
        parts = self._split(target_name)
        return (target_name if parts is None
                else f"{self.prefix}.{self.layers.index(parts[0])}.{parts[1]}")


def _shared(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach(), requires_grad=False)


def check_base_layers(layers, num_blocks: int) -> list[int]:
    layers = [int(i) for i in layers]
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= num_blocks:
        raise ValueError(f"the draft's blocks must be distinct ascending indices in "
                         f"[0, {num_blocks}), at least one, got {layers}")
    return layers


def draft_config(model: nn.Module, base_layers: list[int]):
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(base_layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in base_layers]
    return config


def assemble_draft(model: nn.Module, spec: DraftSpec) -> nn.Module:
    """The draft `spec` describes, on `model`'s tensors."""
    prefix, blocks = block_list(model)
    layers = check_base_layers(spec.base_layers, len(blocks))
    with torch.device("meta"):
        draft = type(model)(draft_config(model, layers))
    draft.eval()
    names = BlockNames(prefix, layers)
    target_name, draft_name = names.in_target, names.in_draft
    for name, _ in list(draft.named_parameters(remove_duplicate=False)):
        owner, leaf = draft.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        owner._parameters[leaf] = _shared(model.get_parameter(target_name(name)))
    for name, _ in list(draft.named_buffers(remove_duplicate=False)):
        owner, leaf = draft.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        owner._buffers[leaf] = model.get_buffer(target_name(name))
    live = {}  # the spec the draft carries points at its own parameters, which healing trains
    for name, factor in spec.factors.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"the draft factors {name!r}, which is a "
                             f"{type(linear).__name__} in the target, not an nn.Linear")
        build = _cur_module if isinstance(factor, CURFactor) else _narrow_module
        module, live[name] = build(name, linear, factor)
        draft.set_submodule(draft_name(name), module)
    if spec.head_token_ids is not None:
        head = model.get_output_embeddings()
        draft.set_output_embeddings(FrequentTokenHead(head.weight, spec.head_token_ids,
                                                      getattr(head, "bias", None)))
    _check_materialised(draft)
    draft.generation_config = copy.deepcopy(model.generation_config)
    draft.draft_spec = replace(spec, base_layers=layers, factors=live)
    return draft


def _cur_module(name: str, linear: nn.Linear, factor: CURFactor
                ) -> tuple[CURLinear, CURFactor]:
    if factor.C.dim() != 2 or factor.C.shape[0] != linear.out_features:
        raise ValueError(f"{name}.C must have {linear.out_features} rows (the target's "
                         f"out_features), got shape {tuple(factor.C.shape)}")
    dtype, device = linear.weight.dtype, linear.weight.device
    module = CURLinear(factor.C.to(device, dtype), factor.U.to(device, dtype), linear.weight,
                       linear.bias, row_indices=factor.rows.to(device),
                       col_indices=factor.cols.to(device), gather=True)
    return module, CURFactor(module.C, module.U, module.row_indices, module.col_indices)


def _narrow_module(name: str, linear: nn.Linear, factor: NarrowFactor
                   ) -> tuple[NarrowLinear, NarrowFactor]:
    dtype, device = linear.weight.dtype, linear.weight.device
    shape = {"out_features": linear.out_features, "in_features": linear.in_features}
    if factor.rows is not None:
        module = NarrowLinear(linear.weight, linear.bias, **shape, rows=factor.rows.to(device),
                              scatter_rows=factor.scatter_rows, gather_rows=True)
        return module, NarrowFactor(module.row_indices, None, module.scatter_rows, False)
    if factor.weight.dim() != 2 or factor.weight.shape != (linear.out_features,
                                                           len(factor.cols)):
        raise ValueError(f"{name}.weight must have shape ({linear.out_features}, "
                         f"{len(factor.cols)}) (the target's out_features × the kept inputs), "
                         f"got {tuple(factor.weight.shape)}")
    bias = None if factor.bias is None else factor.bias.to(device, dtype)
    module = NarrowLinear(factor.weight.to(device, dtype), bias, **shape,
                          cols=factor.cols.to(device), gather_cols=factor.gather_cols)
    return module, NarrowFactor(None, module.col_indices, False, module.gather_cols,
                                module.weight, module.bias)


def _check_materialised(draft: nn.Module) -> None:
    left = [name for name, t in [*draft.named_parameters(), *draft.named_buffers()]
            if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"the draft has tensors the target does not provide: {left[:5]}")
    for module in draft.modules():  # tensors kept as plain attributes (e.g. rotary copies)
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                raise RuntimeError(f"the draft's {type(module).__name__}.{key} stayed on the "
                                   f"meta device")


def draft_spec(draft: nn.Module) -> DraftSpec:
    spec = getattr(draft, "draft_spec", None)
    if not isinstance(spec, DraftSpec):
        raise TypeError(f"draft must be a model made by make_draft or load_draft, got a "
                        f"{type(draft).__name__} without a draft spec")
    return spec
