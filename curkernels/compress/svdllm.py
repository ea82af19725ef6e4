"""SVD-LLM (Wang et al. 2024): truncation-aware whitening. With XᵀX = LLᵀ (Cholesky of the
damped input Gram matrix), the singular values of W·L are exactly the output errors
‖(W − Ŵ)X‖ each truncated component costs, so truncating the SVD of W·L is optimal for the
calibration outputs: W ≈ (U_r√Σ)·(√ΣV_rᵀL⁻¹)."""

import torch
from torch import nn

from .calibration import collect_linear_stats
from .lowrank import allocate_ranks, bias_of, replace_with_low_rank
from .report import ModuleReport


def whitening_factor(second_moment: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor of E[xxᵀ] + damping·mean(diag)·I (fp64). The damping keeps
    it positive definite when some input directions are never excited."""
    n = second_moment.shape[0]
    gram = second_moment.double()
    scale = float(gram.diagonal().mean().clamp_min(1e-12))
    shift = damping * scale
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + shift * eye)
    while int(info) > 0:  # still indefinite (rounding): raise the damping tenfold
        shift = max(shift * 10, 1e-10 * scale)
        factor, info = torch.linalg.cholesky_ex(gram + shift * eye)
    return factor


def compress_svdllm(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *, calib,
                    rank_multiple: int = 1, damping: float = 1e-4, allocation: str = "uniform",
                    **_) -> list[ModuleReport]:
    """`allocation="uniform"`: every module keeps `keep` of its entries. `"global"`: ranks share
    the whole budget (`allocate_ranks` on the whitened spectra, which measure each module's
    output error; the SVDs are kept in memory until all modules are factored)."""
    if damping < 0:
        raise ValueError(f"damping must be ≥ 0, got {damping}")
    if allocation not in ("uniform", "global"):
        raise ValueError(f"allocation must be 'uniform' or 'global', got {allocation!r}")
    stats = collect_linear_stats(model, targets, calib, gram=True, desc="svd-llm calibration")

    def whitened_svd(name, linear):
        L = whitening_factor(stats[name].second_moment, damping)
        return L, torch.linalg.svd(linear.weight.detach().double() @ L, full_matrices=False)

    svds = {name: whitened_svd(name, linear) for name, linear in targets.items()} \
        if allocation == "global" else {}
    ranks = None
    if svds:
        ranks = allocate_ranks({name: (svd.S ** 2, *targets[name].weight.shape)
                                for name, (_, svd) in svds.items()}, keep, rank_multiple)

    def factorize(name, linear, rank):
        L, (left, sigma, right_t) = svds.pop(name) if svds else whitened_svd(name, linear)
        root = sigma[:rank].sqrt()
        A, B_white = left[:, :rank] * root, root[:, None] * right_t[:rank]
        # B = B_white·L⁻¹, i.e. Bᵀ = L⁻ᵀ·B_whiteᵀ: a triangular solve, no inverse formed
        B = torch.linalg.solve_triangular(L.T, B_white.T, upper=True).T
        return A, B, bias_of(linear)

    return replace_with_low_rank(model, targets, keep, rank_multiple, factorize, stats, ranks)
