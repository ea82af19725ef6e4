"""The torch backend: the cuBLAS chain (a layer, a sibling group) on GPUs, a reference on CPUs."""

import torch
import torch.nn.functional as F

_CPU_NATIVE_DTYPES = (torch.float32, torch.float64)


def cur_linear_torch(x: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None,
                     R: torch.Tensor, bias: torch.Tensor | None,
                     rows: torch.Tensor | None) -> torch.Tensor:
    """y = ((x·Rᵀ)·Uᵀ)·Cᵀ + b; x is (..., n), as for `F.linear`.

    On CUDA every stage is one GEMM in the input's dtype (cuBLAS accumulates in fp32 and rounds
    each stage's output, as the chain of `F.linear`s users compare against does): casting the
    factors to fp32 would re-read and re-write every weight on every call. On the CPU half
    precision is computed in fp32, where half GEMMs are slow or missing.
    """
    factor_R = R.index_select(0, rows) if rows is not None else R
    if x.is_cuda or x.dtype in _CPU_NATIVE_DTYPES:
        t = F.linear(x, factor_R)
        if U is not None:
            t = t * U if U.dim() == 1 else F.linear(t, U)
        return F.linear(t, C, bias)
    compute = torch.float32
    t = x.to(compute) @ factor_R.to(compute).t()
    if U is not None:
        t = t * U.to(compute) if U.dim() == 1 else t @ U.to(compute).t()
    y = t @ C.to(compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def shared_chain(x: torch.Tensor, weight: torch.Tensor, expands: list[torch.Tensor],
                 biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """A sibling group's outputs by the shared cuBLAS chain, in torch ops (differentiable): one
    GEMM over the stacked shrink weight, then one a member over its columns of the product."""
    product = F.linear(x, weight)
    outputs, start = [], 0
    for C, bias in zip(expands, biases, strict=True):
        stop = start + C.shape[1]
        outputs.append(F.linear(product[..., start:stop], C, bias))
        start = stop
    return outputs
