"""Run one `cur_linear` call on the backend dispatch picks for it."""

import math

import torch

from .backends import backend_function
from .dispatch import choose_backend, requested_backend


def resolve_backend(backend: str, x2d: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None,
                    rows_or_R: torch.Tensor) -> str:
    """The dispatch choice, with float64 kept on the only backend that computes in it."""
    shape = (C.shape[0], x2d.shape[1], rows_or_R.shape[0])
    chosen = choose_backend(backend, x2d, x2d.shape[0], shape, linked=U is not None)
    if x2d.dtype == torch.float64 and chosen != "torch":
        if requested_backend(backend) != "auto":
            raise TypeError(f"backend {chosen!r} does not compute in float64; use "
                            f"backend='torch' or a float32/float16/bfloat16 input")
        return "torch"
    return chosen


def run_cur_linear(x: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None, R: torch.Tensor,
                   bias: torch.Tensor | None, rows: torch.Tensor | None,
                   backend: str) -> torch.Tensor:
    """Flatten x to (M, n), dispatch, run, restore the leading dimensions."""
    flat = x.dim() != 2
    # An explicit row count: reshape(-1, 0) is ambiguous when the feature dimension is empty.
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if flat else x
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    chosen = resolve_backend(backend, x2d, C, U, R if rows is None else rows)
    y2d = backend_function(chosen)(x2d, C, U, R, bias, rows)
    return y2d.reshape(*x.shape[:-1], C.shape[0]) if flat else y2d
