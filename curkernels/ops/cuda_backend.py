"""The CUDA backend of `cur_linear`: a thin wrapper over the fused decode kernel of
`curkernels._C` (csrc/cur_linear_decode.cu), registered as torch.ops.curkernels_C.cur_linear.

The kernel handles any number of rows (in launches of 16); dispatch sends it decode calls.
"""

import torch

import curkernels._C  # noqa: F401  (loading the library registers the op)

_cur_linear_decode = torch.ops.curkernels_C.cur_linear.default


def cur_linear_cuda(x2d: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None,
                    R: torch.Tensor, bias: torch.Tensor | None,
                    rows: torch.Tensor | None) -> torch.Tensor:
    """y = ((x·Rᵀ)·Uᵀ)·Cᵀ + b for x2d (M, n); the backend contract of ops/backends.py."""
    return _cur_linear_decode(x2d, C, U, R, bias, rows)
