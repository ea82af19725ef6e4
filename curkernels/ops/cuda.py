"""Binds the CUDA backend of `cur_linear`: `curkernels._C`'s fused decode kernel.

The kernel (csrc/cur_linear_decode.cu) is registered as torch.ops.curkernels_C.cur_linear.

`cur_linear_cuda(x, C, U, R, bias, rows) -> y` is the op itself, with no Python wrapper
around it: a wrapper's frame costs host time on every eager decode call. x is (..., n), as
`F.linear` takes it (made contiguous in C++ only when it is not); the kernel handles any number
of rows (in launches of 16) and checks its operands (device, dtype, shape, contiguity);
dispatch sends it decode calls.
"""

import torch

import curkernels._C  # noqa: F401  (loading the library registers the op)

cur_linear_cuda = torch.ops.curkernels_C.cur_linear.default
