"""Fidelity of one factored weight: plain and activation-weighted relative errors."""

import torch


@torch.no_grad()
def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F, in fp64."""
    w = weight.detach().double()
    return float(torch.linalg.norm(w - approx.detach().double().to(w.device))
                 / torch.linalg.norm(w).clamp_min(1e-30))


@torch.no_grad()
def activation_error(weight: torch.Tensor, approx: torch.Tensor, mean_sq: torch.Tensor) -> float:
    """‖(W − Ŵ)·diag(√E[x²])‖_F / ‖W·diag(√E[x²])‖_F: the error weighted by how strongly each
    input channel is driven on the calibration data (the diagonal of E[xxᵀ])."""
    w = weight.detach().double()
    scale = mean_sq.double().to(w.device).sqrt()
    diff = (w - approx.detach().double().to(w.device)) * scale
    return float(torch.linalg.norm(diff) / torch.linalg.norm(w * scale).clamp_min(1e-30))
