"""ROM (reduced order modelling of latent features, arXiv 2312.07046).

Layer by layer in forward order, each Linear is calibrated on inputs produced by the
already-compressed layers before it (so errors are corrected downstream, not compounded).
For outputs y = Wx + b with mean μ and mean-centred covariance Σ_y = E[(y − μ)(y − μ)ᵀ],
the symmetric eigensolver gives eigenvectors in descending eigenvalue order; V_r (m×r) keeps
the leading r. The layer is re-parameterised as

    y' = V_r·(V_rᵀW)·x + b',    b' = V_rV_rᵀb + (I − V_rV_rᵀ)μ,

i.e. y' = μ + V_rV_rᵀ(y − μ): the centred output projected on its r principal directions,
whose mean is exactly μ (E[y'] = V_rV_rᵀ(μ − b) + V_rV_rᵀb + (I − V_rV_rᵀ)μ = μ).
Stored as A = V_r (m×r), B = V_rᵀW (r×n). The budget rule r = ⌊keep·mn/(m+n)⌋ is the
largest rank whose factors fit `keep` of the layer (`rank_for_keep`); `layers=` picks the
blocks (the paper compresses the last N). Everything runs on the model's device — a CPU is
enough, as in the paper.
"""

import torch
from torch import nn

from .calibration import collect_linear_stats, model_device, to_device
from .lowrank import bias_of, replace_with_low_rank
from .report import ModuleReport


@torch.no_grad()
def forward_order(model: nn.Module, targets: dict[str, nn.Linear], batch: dict) -> list[str]:
    """Target names in the order one forward pass reaches them."""
    order = []
    handles = [linear.register_forward_hook(lambda *_, name=name: order.append(name))
               for name, linear in targets.items()]
    try:
        model(**to_device(batch, model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    seen = dict.fromkeys(order)
    return list(seen) + [name for name in targets if name not in seen]


def rom_factors(weight: torch.Tensor, bias: torch.Tensor | None, output_mean: torch.Tensor,
                output_covariance: torch.Tensor, rank: int):
    """(A = V_r, B = V_rᵀW, b') from the output statistics, all fp64."""
    eigenvalues, eigenvectors = torch.linalg.eigh(output_covariance.double())
    basis = eigenvectors[:, torch.argsort(eigenvalues, descending=True)[:rank]]
    w = weight.detach().double()
    mean = output_mean.double()
    projected_mean = basis @ (basis.T @ mean)
    new_bias = mean - projected_mean
    if bias is not None:
        new_bias = new_bias + basis @ (basis.T @ bias.double())
    return basis, basis.T @ w, new_bias


def compress_rom(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *, calib,
                 rank_multiple: int = 1, **_) -> list[ModuleReport]:
    reports = []
    for name in forward_order(model, targets, calib[0]):
        linear = targets[name]
        stats = collect_linear_stats(model, {name: linear}, calib, outputs=True,
                                     stop_after=True, desc=f"rom {name}")

        def factorize(_, linear, rank, s=stats[name]):
            return rom_factors(linear.weight, bias_of(linear), s.output_mean,
                               s.output_covariance, rank)

        reports += replace_with_low_rank(model, {name: linear}, keep, rank_multiple, factorize,
                                         stats)
    return reports
