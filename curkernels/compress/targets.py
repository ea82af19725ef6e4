"""Which Linears a method compresses: name patterns, block (layer) filters and the methods'
defaults when the user names none."""

import re

from torch import nn

from ..nn.surgery import find_linears, name_matches
from .calibration import is_causal_lm
from .layer_selection import block_list

_IN_REPEATED_BLOCK = re.compile(r"\.\d+\.")

# The CURing paper on decoder LMs: q/k/gate of the 10 blocks with the smallest angular distance.
CURING_DECODER_TARGETS = ("q_proj", "k_proj", "gate_proj")
CURING_DECODER_LAYERS = 10


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside a repeated block (decoder/encoder layers): heads, poolers and
    embeddings stay dense."""
    return {name: linear for name, linear in find_linears(model).items()
            if _IN_REPEATED_BLOCK.search(f".{name}.")}


def default_scope(method: str, model: nn.Module) -> tuple[tuple[str, ...] | None, int | None]:
    """(target patterns, number of blocks to pick by angular distance) when the user gives
    neither; None means every block Linear / every block."""
    if method == "curing" and is_causal_lm(model):
        blocks = len(block_list(model)[1])
        return CURING_DECODER_TARGETS, max(1, min(CURING_DECODER_LAYERS, blocks - 2))
    return None, None


def resolve_targets(model: nn.Module, targets=None, exclude=(), layers=None
                    ) -> dict[str, nn.Linear]:
    """Named patterns (or every block Linear), restricted to the block indices in `layers`
    when given; an empty match is an error, not a no-op."""
    found = block_linears(model) if targets is None else find_linears(model, targets)
    found = {name: linear for name, linear in found.items()
             if not any(name_matches(name, pattern) for pattern in exclude)}
    if layers is not None:
        prefix, blocks = block_list(model)
        bad = [i for i in layers if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {len(blocks)} blocks")
        starts = tuple(f"{prefix}.{i}." for i in layers)
        found = {name: linear for name, linear in found.items() if name.startswith(starts)}
    if not found:
        what = "no nn.Linear inside repeated blocks" if targets is None else (
            f"targets {list(targets)} matched no nn.Linear")
        if layers is not None:
            what += f" in layers {list(layers)}"
        raise ValueError(f"nothing to compress: {what} (module names look like "
                         f"{next(iter(find_linears(model)), '<none>')!r})")
    return found
