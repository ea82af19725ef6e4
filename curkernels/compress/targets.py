"""Which Linears a method compresses when the user names none."""

import re

from torch import nn

from ..nn.surgery import find_linears, name_matches

_IN_REPEATED_BLOCK = re.compile(r"\.\d+\.")


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside a repeated block (decoder/encoder layers): heads, poolers and
    embeddings stay dense."""
    return {name: linear for name, linear in find_linears(model).items()
            if _IN_REPEATED_BLOCK.search(f".{name}.")}


def resolve_targets(model: nn.Module, targets=None, exclude=()) -> dict[str, nn.Linear]:
    """Named patterns, or every block Linear; an empty match is an error, not a no-op."""
    found = block_linears(model) if targets is None else find_linears(model, targets)
    found = {name: linear for name, linear in found.items()
             if not any(name_matches(name, pattern) for pattern in exclude)}
    if not found:
        what = "no nn.Linear inside repeated blocks" if targets is None else (
            f"targets {list(targets)} matched no nn.Linear")
        raise ValueError(f"nothing to compress: {what} (module names look like "
                         f"{next(iter(find_linears(model)), '<none>')!r})")
    return found
