"""The Triton backend of `cur_linear`: the decode kernel up to DECODE_MAX_ROWS rows, else prefill."""

import torch

from ..tables import DECODE_MAX_ROWS
from .decode import cur_linear_decode
from .prefill import cur_linear_prefill
from .workspace import ReservedWorkspaces


def cur_linear_triton(x: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None,
                      R: torch.Tensor, bias: torch.Tensor | None,
                      rows: torch.Tensor | None,
                      workspaces: ReservedWorkspaces | None = None) -> torch.Tensor:
    """y = ((x·Rᵀ)·Uᵀ)·Cᵀ + b for a contiguous x (..., n); the backend contract of
    dispatch.py, which binds `workspaces` (the layer's reserved decode workspaces) into the
    choices of decode calls."""
    n, m = x.shape[-1], C.shape[0]
    y = torch.empty((*x.shape[:-1], m), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if n == 0:  # an empty input dimension: R·x = 0
        return y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()
    M = y.numel() // m
    if M <= DECODE_MAX_ROWS:
        cur_linear_decode(x, C, U, R, bias, rows, y, workspaces=workspaces)
    else:
        cur_linear_prefill(x.view(M, n), C, U, R, bias, rows, y.view(M, m))
    return y
