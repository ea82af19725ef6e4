"""Shared plumbing for the two-factor methods: rank from the budget, swap each target for a
`LowRankLinear`, and report errors and time."""

import time
from collections.abc import Callable

import torch
from torch import nn

from ..nn import LowRankLinear, swap_linears
from .budget import rank_for_keep
from .calibration import LinearStats
from .errors import activation_error, relative_error
from .report import ModuleReport

# (name, linear, rank) -> (A m×r, B r×n, bias or None), in fp64
Factorize = Callable[[str, nn.Linear, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def replace_with_low_rank(model: nn.Module, targets: dict[str, nn.Linear], keep: float,
                          rank_multiple: int, factorize: Factorize,
                          stats: dict[str, LinearStats] | None = None) -> list[ModuleReport]:
    reports = []

    def make(name: str, linear: nn.Linear) -> LowRankLinear:
        start = time.perf_counter()
        m, n = linear.weight.shape
        if not torch.isfinite(linear.weight).all():
            raise ValueError(f"the weight of {name!r} holds NaN or Inf: cannot factor it")
        rank = rank_for_keep(m, n, keep, "none", rank_multiple)
        A, B, bias = factorize(name, linear, rank)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"factoring {name!r} produced NaN/Inf factors")
        dtype = linear.weight.dtype
        module = LowRankLinear(A.to(dtype), B.to(dtype), None if bias is None else bias.to(dtype))
        approx = A.double() @ B.double()
        act = None if stats is None else activation_error(linear.weight, approx,
                                                           stats[name].mean_sq)
        reports.append(ModuleReport(name, (m, n), rank, m * n, module.factor_parameters,
                                    relative_error(linear.weight, approx), act,
                                    time.perf_counter() - start))
        return module

    swap_linears(model, targets, make)
    return reports


def split_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of `matrix` (fp64) split evenly: (U_r√Σ, √ΣV_rᵀ)."""
    left, sigma, right_t = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = sigma[:rank].sqrt()
    return left[:, :rank] * root, root[:, None] * right_t[:rank]


def bias_of(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().double()
