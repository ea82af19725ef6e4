"""Plain truncated SVD: W ≈ (U_r√Σ)(√ΣV_rᵀ), no calibration."""

from torch import nn

from .lowrank import bias_of, replace_with_low_rank, split_svd
from .report import ModuleReport


def compress_svd(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *,
                 rank_multiple: int) -> list[ModuleReport]:
    def factorize(name, linear, rank):
        return (*split_svd(linear.weight.detach(), rank), bias_of(linear))

    return replace_with_low_rank(model, targets, keep, rank_multiple, factorize)
