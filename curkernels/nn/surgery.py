"""Model surgery: find target `nn.Linear`s by name pattern and swap them for other modules."""

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn


def name_matches(name: str, pattern: str) -> bool:
    """A pattern is a glob on the full module name ('model.layers.*.self_attn.q_proj') or on
    its trailing dotted parts ('q_proj', 'self_attn.q_proj', 'mlp.*')."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def find_linears(model: nn.Module, patterns: Iterable[str] | None = None,
                 exclude: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """Every `nn.Linear` whose name matches one of `patterns` (all Linears when None)."""
    patterns = None if patterns is None else list(patterns)
    exclude = list(exclude)
    found = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if patterns is not None and not any(name_matches(name, p) for p in patterns):
            continue
        if any(name_matches(name, p) for p in exclude):
            continue
        found[name] = module
    return found


def swap_linears(model: nn.Module, targets: dict[str, nn.Linear],
                 make: Callable[[str, nn.Linear], nn.Module]) -> dict[str, nn.Module]:
    """Replace each target by `make(name, linear)`, in place; returns the new modules."""
    replaced = {}
    for name, linear in targets.items():
        replaced[name] = make(name, linear)
        model.set_submodule(name, replaced[name])
    return replaced
