"""Shared plumbing for the two-factor methods: rank from the budget, swap each target for a
`CURLinear` without U, and report errors and time."""

import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn import CURLinear, swap_linears
from .budget import rank_for_keep
from .calibration import LinearStats, all_finite
from .errors import factored_errors
from .report import ModuleReport

# (name, linear, rank) -> (A m×r, B r×n, bias or None), in fp64
Factorize = Callable[[str, nn.Linear, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def replace_with_low_rank(model: nn.Module, targets: dict[str, nn.Linear], keep: float,
                          rank_multiple: int, factorize: Factorize,
                          stats: dict[str, LinearStats] | None = None,
                          ranks: dict[str, int] | None = None) -> list[ModuleReport]:
    """Swap each target for factorize()'s factors at `ranks[name]`, or by default the same
    budget share for every module (`rank_for_keep`)."""
    reports = []

    def make(name: str, linear: nn.Linear) -> CURLinear:
        start = time.perf_counter()
        m, n = linear.weight.shape
        if not all_finite(linear.weight):
            raise ValueError(f"the weight of {name!r} holds NaN or Inf: cannot factor it")
        rank = ranks[name] if ranks is not None else rank_for_keep(
            m, n, keep, "none", rank_multiple, module=name)
        A, B, bias = factorize(name, linear, rank)
        if not (all_finite(A) and all_finite(B)):
            raise ValueError(f"factoring {name!r} produced NaN/Inf factors")
        dtype = linear.weight.dtype
        module = CURLinear(A.to(dtype), None, B.to(dtype), None if bias is None else bias.to(dtype))
        relative, act = factored_errors(linear.weight, A, B,
                                        None if stats is None else stats[name].mean_sq)
        reports.append(ModuleReport(name, (m, n), rank, m * n, module.factor_parameters,
                                    relative, act, time.perf_counter() - start))
        progress.update()
        return module

    # one bar for the whole swap: LPAF's weighted fits take minutes a module on a CPU
    with tqdm(total=len(targets), desc="factoring", unit="module", leave=False) as progress:
        swap_linears(model, targets, make)
    return reports


def bias_of(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().double()


def allocate_ranks(spectra: dict[str, tuple[torch.Tensor, int, int]], keep: float,
                   multiple: int = 1, relative: bool = True) -> dict[str, int]:
    """Ranks that share one budget, keep·Σmn entries, across modules instead of giving each
    the same share. `spectra[name] = (σ², m, n)` with σ² the descending squared singular values
    whose truncation error the module pays; component k of a module removes a fraction
    σ_k²/Σσ² of its error and costs m + n entries, and components are taken greedily by that
    fraction per entry (a prefix per module, as σ² is sorted). With `relative=False` the σ²
    are compared as they are (when every module's spectrum is in the same units, e.g. of the
    loss). Every module keeps at least `multiple` components; ranks are rounded down to
    `multiple`. No module gets more components than fit in its own m·n entries (the
    breakeven rank): past it the factors would be larger, and slower, than the dense weight.
    Raises when `multiple` components alone pass a module's breakeven rank or the budget."""
    budget = keep * sum(m * n for _, m, n in spectra.values())
    breakeven = {name: rank_for_keep(m, n, 1.0, module=name)
                 for name, (_, m, n) in spectra.items()}
    too_small = [name for name, rank in breakeven.items() if rank < multiple]
    if too_small:
        raise ValueError(f"rank_multiple={multiple} components would make {too_small} larger "
                         f"than dense (break-even ranks {[breakeven[n] for n in too_small]})")
    ranks = dict.fromkeys(spectra, multiple)
    spent = sum(multiple * (m + n) for _, m, n in spectra.values())
    if spent > budget:
        raise ValueError(f"keep={keep:g} cannot give each module rank_multiple={multiple} "
                         f"components ({spent} entries, the budget is {budget:.0f})")
    candidates = []
    for name, (sigma_sq, m, n) in spectra.items():
        share = sigma_sq.double()
        if relative:
            share = share / share.sum().clamp_min(1e-300)
        candidates += [(float(share[k]) / (m + n), name)
                       for k in range(ranks[name], min(len(share), breakeven[name]))]
    for _, name in sorted(candidates, key=lambda c: -c[0]):
        _, m, n = spectra[name]
        if spent + m + n > budget:
            continue  # a cheaper module's component may still fit
        ranks[name] += 1
        spent += m + n
    return {name: rank // multiple * multiple for name, rank in ranks.items()}
