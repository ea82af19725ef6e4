"""Plain truncated SVD: W ≈ (U_r√Σ)(√ΣV_rᵀ), no calibration."""

from torch import nn

from ..ops.factors import split_evenly, truncated_svd
from .lowrank import bias_of, replace_with_low_rank
from .report import ModuleReport


def compress_svd(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *,
                 rank_multiple: int) -> list[ModuleReport]:
    def factorize(name, linear, rank):
        return (*split_evenly(*truncated_svd(linear.weight, rank)), bias_of(linear))

    return replace_with_low_rank(model, targets, keep, rank_multiple, factorize)
