"""Fidelity of one factored weight: plain and activation-weighted relative errors."""

from collections.abc import Callable

import torch

# rows of the weight compared at a time, so no fp64 copy of a whole large weight is made
# (each temporary 8 MB: a handful live at once)
CHUNK_VALUES = 1 << 20


@torch.no_grad()
def _error_ratios(weight: torch.Tensor, approx_rows: Callable[[int, int], torch.Tensor],
                  scales: list[torch.Tensor | None]) -> list[float]:
    """‖(W − Ŵ)·diag(scale)‖_F / ‖W·diag(scale)‖_F in fp64 for each scale (None: no scale),
    Ŵ's rows start:stop being `approx_rows(start, stop)`, a block of rows at a time, each
    block formed once for every scale."""
    m, n = weight.shape
    rows = max(1, CHUNK_VALUES // max(n, 1))
    errors, totals = [0.0] * len(scales), [0.0] * len(scales)
    for start in range(0, m, rows):
        stop = min(start + rows, m)
        w = weight[start:stop].detach().double()
        diff = w - approx_rows(start, stop).detach().double().to(w.device)
        for i, scale in enumerate(scales):
            errors[i] += float((diff if scale is None else diff * scale).square().sum())
            totals[i] += float((w if scale is None else w * scale).square().sum())
    return [(error / max(total, 1e-60)) ** 0.5 for error, total in zip(errors, totals, strict=True)]


def _channel_scale(weight: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
    return mean_sq.double().to(weight.device).sqrt()


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F, in fp64."""
    return _error_ratios(weight, lambda start, stop: approx[start:stop], [None])[0]


def activation_error(weight: torch.Tensor, approx: torch.Tensor, mean_sq: torch.Tensor) -> float:
    """‖(W − Ŵ)·diag(√E[x²])‖_F / ‖W·diag(√E[x²])‖_F: the error weighted by how strongly each
    input channel is driven on the calibration data (the diagonal of E[xxᵀ])."""
    return _error_ratios(weight, lambda start, stop: approx[start:stop],
                         [_channel_scale(weight, mean_sq)])[0]


def factored_errors(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    mean_sq: torch.Tensor | None) -> tuple[float, float | None]:
    """`relative_error` and `activation_error` (None without `mean_sq`) of Ŵ = A·B, whose rows
    are formed a block at a time: Ŵ itself is never held."""
    B = B.double()

    def rows(start, stop):
        return A[start:stop].double() @ B

    if mean_sq is None:
        return _error_ratios(weight, rows, [None])[0], None
    relative, activation = _error_ratios(weight, rows, [None, _channel_scale(weight, mean_sq)])
    return relative, activation
