"""CURing (arXiv 2501.04211): W ≈ C·U·R with real columns C = W[:, J] and rows R = W[I, :].

As the paper's code: score S = |W| ⊙ √E[x²] (the Wanda score: weight magnitude times the
input channel's activation norm); I and J by DEIM on the leading left/right singular vectors
of S; U = C⁺·W·R⁺ in fp64 (the best link for the chosen rows and columns). The rank is
min(budget rank, `max_rank`); with keep=1 the budget rank is the break-even rank where
r(m+n) + r² = mn, so `keep=1.0, max_rank=256` is the paper's rule. `energy=` switches to the
energy rank rule (smallest r holding that fraction of S's squared singular values), still
capped by the budget.
"""

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import CURLinear, swap_linears
from ..ops.factors import truncated_svd
from .budget import rank_for_keep
from .calibration import collect_linear_stats
from .deim import SELECTIONS
from .errors import activation_error, relative_error
from .report import ModuleReport

PAPER_MAX_RANK = 256
SVD_ALGORITHMS = ("randomized", "exact")


@dataclass
class CURFactors:
    C: torch.Tensor
    U: torch.Tensor
    R: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def leading_singular_vectors(matrix: torch.Tensor, rank: int, svd: str = "randomized",
                             oversample: int = 16, iterations: int = 2):
    """Left (m×r) and right (n×r) leading singular vectors; randomized (Halko et al.) unless
    `svd="exact"` or the sketch would not be smaller than the matrix."""
    if svd not in SVD_ALGORITHMS:
        raise ValueError(f"svd must be one of {SVD_ALGORITHMS}, got {svd!r}")
    sketch = rank + oversample
    if svd == "exact" or sketch >= min(matrix.shape):
        left, _, right_t = truncated_svd(matrix, rank, compute=matrix.dtype)
        return left, right_t.T
    left, _, right = torch.svd_lowrank(matrix, q=sketch, niter=iterations)
    return left[:, :rank], right[:, :rank]


def energy_rank(matrix: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values hold `energy` of ‖matrix‖_F²."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be a fraction in (0, 1], got {energy!r}")
    sigma_sq = torch.linalg.svdvals(matrix.double()) ** 2
    cumulative = torch.cumsum(sigma_sq, 0) / sigma_sq.sum()
    # The sums round: a fraction a few ulps short of `energy` holds it. Without the slack,
    # energy 1 can end up past the last singular value (a cumulative fraction of 1 − 1e-16).
    slack = 4 * sigma_sq.numel() * torch.finfo(cumulative.dtype).eps
    wanted = torch.tensor(energy - slack, dtype=cumulative.dtype, device=cumulative.device)
    return min(int(torch.searchsorted(cumulative, wanted)) + 1, sigma_sq.numel())


@torch.no_grad()
def cur_decompose(weight: torch.Tensor, mean_sq: torch.Tensor | None, rank: int, *,
                  selection: str = "deim", svd: str = "randomized") -> CURFactors:
    """C, U, R and the row/column indices for one weight (m×n); `mean_sq` is E[x²] per input
    channel (None: plain |W|)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {sorted(SELECTIONS)}, got {selection!r}")
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}×{n} weight, got {rank}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or Inf: cannot factor it")
    score = w.abs() if mean_sq is None else w.abs() * mean_sq.float().to(w.device).sqrt()
    left, right = leading_singular_vectors(score, rank, svd)
    select = SELECTIONS[selection]
    rows, cols = select(left), select(right)
    w64 = weight.detach().double()
    C, R = w64[:, cols], w64[rows, :]
    U = torch.linalg.pinv(C) @ w64 @ torch.linalg.pinv(R)
    return CURFactors(C, U, R, rows, cols)


def curing_rank(m: int, n: int, keep: float, max_rank: int | None, multiple: int,
                module: str | None = None) -> int:
    """The budget rank, capped at `max_rank` and still a multiple of `multiple`."""
    rank = rank_for_keep(m, n, keep, "full", multiple, module=module)
    if max_rank is None or max_rank >= rank:
        return rank
    if max_rank < multiple:
        raise ValueError(f"max_rank={max_rank} is below rank_multiple={multiple}")
    return max_rank // multiple * multiple


def compress_curing(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *, calib,
                    rank_multiple: int, selection: str, max_rank: int | None,
                    energy: float | None, svd: str) -> list[ModuleReport]:
    """Options as `CURingConfig` documents and checks them."""
    stats = collect_linear_stats(model, targets, calib, desc="curing calibration")
    reports = []

    def factor(name: str, linear: nn.Linear) -> CURLinear:
        start = time.perf_counter()
        m, n = linear.weight.shape
        rank = curing_rank(m, n, keep, max_rank, rank_multiple, name)
        mean_sq = stats[name].mean_sq
        if energy is not None:
            score = linear.weight.detach().abs().double() * mean_sq.sqrt()
            rank = max(1, min(rank, energy_rank(score, energy)))
        f = cur_decompose(linear.weight, mean_sq, rank, selection=selection, svd=svd)
        dtype = linear.weight.dtype
        module = CURLinear(f.C.to(dtype), f.U.to(dtype), f.R.to(dtype),
                           None if linear.bias is None else linear.bias.detach(),
                           row_indices=f.rows, col_indices=f.cols)
        approx = f.C @ f.U @ f.R
        reports.append(ModuleReport(name, (m, n), rank, m * n, module.factor_parameters,
                                    relative_error(linear.weight, approx),
                                    activation_error(linear.weight, approx, mean_sq),
                                    time.perf_counter() - start))
        return module

    swap_linears(model, targets, factor)
    return reports
