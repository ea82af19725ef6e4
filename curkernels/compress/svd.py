"""Plain truncated SVD: W ≈ (U_r√Σ)(√ΣV_rᵀ), no calibration."""

import time

import torch
from torch import nn

from ..nn import LowRankLinear, swap_linears
from .budget import rank_for_keep
from .report import ModuleReport


@torch.no_grad()
def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F in fp32 or better."""
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    return float(torch.linalg.norm(w - approx.to(w.dtype)) / torch.linalg.norm(w).clamp_min(1e-30))


def compress_svd(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *,
                 rank_multiple: int = 1, **_) -> list[ModuleReport]:
    reports = []

    def factor(name: str, linear: nn.Linear) -> LowRankLinear:
        start = time.perf_counter()
        m, n = linear.weight.shape
        rank = rank_for_keep(m, n, keep, "none", rank_multiple)
        module = LowRankLinear.from_linear(linear, rank)
        error = relative_error(linear.weight, module.A.double() @ module.B.double())
        reports.append(ModuleReport(name, (m, n), rank, m * n, module.factor_parameters,
                                    error, None, time.perf_counter() - start))
        return module

    swap_linears(model, targets, factor)
    return reports
