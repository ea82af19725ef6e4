"""The public functional op: y = ((x·Rᵀ)·Uᵀ)·Cᵀ + b."""

import torch

from .execute import run_cur_linear
from .library import cur_linear_op
from .validation import check_cur_linear_args, check_input, check_rows_in_range


def _requires_grad(x, C, U, R, bias) -> bool:
    # Spelled out: a generator over the tensors costs more than the checks themselves.
    return (x.requires_grad or C.requires_grad or R.requires_grad
            or (U is not None and U.requires_grad) or (bias is not None and bias.requires_grad))


def cur_linear(x: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None, R: torch.Tensor,
               bias: torch.Tensor | None = None, *, rows: torch.Tensor | None = None,
               backend: str = "auto", check_rows: bool = True,
               check_factors: bool = True) -> torch.Tensor:
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
        check_factors: validate every argument (default). Modules validate their factors
            when they are built and pass False: then only x is checked against them, on every
            call, which keeps the eager per-call host cost near a plain `F.linear`'s.

    Returns:
        (..., m) tensor of x's dtype, accumulated in fp32.
    """
    if torch.compiler.is_compiling():
        return cur_linear_op(x, C, U, R, bias, rows, backend)
    if check_factors:
        check_cur_linear_args(x, C, U, R, bias, rows)
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if rows is not None and check_rows:
        check_rows_in_range(rows, R.shape[0])
    if torch.is_grad_enabled() and _requires_grad(x, C, U, R, bias):
        # Checked here too: a meta or fake x would reach the op's shape function, not the runner.
        check_input(x, C, R)
        return cur_linear_op(x, C, U, R, bias, rows, backend)
    # Eager inference skips the custom-op machinery (autograd wrapper, dispatcher round trip):
    # its per-call host cost is the same order as a decode kernel's whole runtime.
    return run_cur_linear(x, C, U, R, bias, rows, backend)
