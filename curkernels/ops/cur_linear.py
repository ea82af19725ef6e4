"""The public functional op: y = ((x·Rᵀ)·Uᵀ)·Cᵀ + b."""

import torch

from .backends import backend_function
from .dispatch import choose_backend, requested_backend
from .library import cur_linear_op
from .validation import check_cur_linear_args, check_rows_in_range


def _needs_graph(*tensors) -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cur_linear(x: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None, R: torch.Tensor,
               bias: torch.Tensor | None = None, *, rows: torch.Tensor | None = None,
               backend: str = "auto", check_rows: bool = True) -> torch.Tensor:
    """The three-factor product on the last dimension of `x`.

    Args:
        x: (..., n) input, float32/float16/bfloat16 (float64: torch backend only).
        C: (m, c) expand factor. U: (c, r) link, (r,) diagonal, or None (two factors, c = r).
        R: (r, n) shrink factor — or, with `rows`, a base weight W (k, n) whose rows
            W[rows] form R without a copy.
        bias: optional (m,).
        rows: optional int64 (r,) gather indices into R.
        backend: 'auto' | 'torch' | 'triton' | 'cuda'; CURKERNELS_BACKEND forces one when
            'auto'. A named backend that cannot run raises BackendUnavailableError.
        check_rows: bound-check `rows` on the host (one device sync). Modules check once
            when indices are set and pass False.

    Returns:
        (..., m) tensor of x's dtype, accumulated in fp32.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:
        check_cur_linear_args(x, C, U, R, bias, rows)
        if rows is not None and check_rows:
            check_rows_in_range(rows, R.shape[0])
    num_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    chosen = choose_backend(backend, x, num_rows)
    if x.dtype == torch.float64 and chosen != "torch":
        if requested_backend(backend) != "auto":
            raise TypeError(f"backend {chosen!r} does not compute in float64; use "
                            f"backend='torch' or a float32/float16/bfloat16 input")
        chosen = "torch"
    if _needs_graph(x, C, U, R, bias):
        return cur_linear_op(x, C, U, R, bias, rows, chosen)
    # Eager inference skips the custom-op machinery: its per-call host cost is the same order
    # as a decode kernel's whole runtime.
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    y2d = backend_function(chosen)(x2d, C, U, R, bias, rows)
    return y2d.reshape(*x.shape[:-1], C.shape[0])
