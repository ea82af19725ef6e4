"""Assemble a draft model whose tensors are the target's own, read in place.

The draft is the target's architecture built on the meta device with only the kept blocks;
every parameter and buffer is then the target's tensor (a new `nn.Parameter` on the same
storage, frozen), the factored Linears are `CURLinear`s in the gather form (R = the target's
weight, rows picked by `row_indices`), and the head may score a frequent-token subset. Only
C, U, the indices and the head's token ids belong to the draft. It is its own `nn.Module`, so
it keeps its own KV cache and runs anywhere the target runs (`generate(assistant_model=...)`).
"""

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..compress.layer_selection import block_list
from ..nn import CURLinear
from .head import FrequentTokenHead


@dataclass
class CURFactor:
    """What a draft adds for one factored Linear: R = W[rows] is the target's."""
    C: torch.Tensor
    U: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


@dataclass
class DraftSpec:
    """Everything that defines a draft beside the target's weights (saved by `save_draft`)."""
    method: str
    base_layers: list[int]  # the target block each draft block reads
    factors: dict[str, CURFactor] = field(repr=False)  # keyed by the target's module name
    head_token_ids: torch.Tensor | None
    base: dict  # identity.base_identity of the target


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
    block_prefix = prefix + "."

    def target_name(name: str) -> str:
        if not name.startswith(block_prefix):
            return name
        index, rest = name[len(block_prefix):].split(".", 1)
        return f"{block_prefix}{layers[int(index)]}.{rest}"

    def draft_name(name: str) -> str:
        index, rest = name[len(block_prefix):].split(".", 1)
        return f"{block_prefix}{layers.index(int(index))}.{rest}"

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
        if factor.C.dim() != 2 or factor.C.shape[0] != linear.out_features:
            raise ValueError(f"{name}.C must have {linear.out_features} rows (the target's "
                             f"out_features), got shape {tuple(factor.C.shape)}")
        dtype, device = linear.weight.dtype, linear.weight.device
        module = CURLinear(factor.C.to(device, dtype), factor.U.to(device, dtype), linear.weight,
                           linear.bias, row_indices=factor.rows.to(device),
                           col_indices=factor.cols.to(device), gather=True)
        draft.set_submodule(draft_name(name), module)
        live[name] = CURFactor(module.C, module.U, module.row_indices, module.col_indices)
    if spec.head_token_ids is not None:
        head = model.get_output_embeddings()
        draft.set_output_embeddings(FrequentTokenHead(head.weight, spec.head_token_ids,
                                                      getattr(head, "bias", None)))
    _check_materialised(draft)
    draft.generation_config = copy.deepcopy(model.generation_config)
    draft.draft_spec = replace(spec, base_layers=layers, factors=live)
    return draft


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
