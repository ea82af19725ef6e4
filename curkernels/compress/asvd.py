"""ASVD (activation-aware SVD, Yuan et al. 2023): scale input channels by S = diag(E|x|^α)
so that channels carrying large activations are approximated more carefully, take the SVD of
W·S, truncate, and undo the scaling: W ≈ (U_r√Σ)·(√ΣV_rᵀS⁻¹)."""

from torch import nn

from ..ops.factors import split_evenly, truncated_svd
from .calibration import collect_linear_stats
from .lowrank import bias_of, replace_with_low_rank
from .report import ModuleReport


def compress_asvd(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *, calib,
                  rank_multiple: int, alpha: float) -> list[ModuleReport]:
    """`alpha` ≥ 0 as `ASVDConfig` checks it."""
    stats = collect_linear_stats(model, targets, calib, desc="asvd calibration")

    def factorize(name, linear, rank):
        mean_abs = stats[name].mean_abs
        # a channel that never fired gets the smallest non-zero scale, not a division by 0
        floor = mean_abs[mean_abs > 0].min() if (mean_abs > 0).any() else mean_abs.new_tensor(1.0)
        scale = mean_abs.clamp_min(floor) ** alpha
        A, B = split_evenly(*truncated_svd(linear.weight.detach().double() * scale, rank))
        return A, B / scale, bias_of(linear)

    return replace_with_low_rank(model, targets, keep, rank_multiple, factorize, stats)
