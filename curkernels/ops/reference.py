"""The torch reference of the three-factor product: the CPU path and the ground truth."""

import torch


def cur_linear_torch(x2d: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None,
                     R: torch.Tensor, bias: torch.Tensor | None,
                     rows: torch.Tensor | None) -> torch.Tensor:
    """y = ((x·Rᵀ)·Uᵀ)·Cᵀ + b with fp32 accumulation; x2d is (M, n)."""
    compute = torch.float32 if x2d.dtype in (torch.float16, torch.bfloat16) else x2d.dtype
    factor_R = R.index_select(0, rows) if rows is not None else R
    t = x2d.to(compute) @ factor_R.to(compute).t()
    if U is not None:
        t = t * U.to(compute) if U.dim() == 1 else t @ U.to(compute).t()
    y = t @ C.to(compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x2d.dtype)
