"""Argument checks for `cur_linear`: every failure names the argument and what was expected."""

import torch

# float64 is for references and gradcheck: only the torch backend computes in it.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name: str, t: torch.Tensor, ndim: int | tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in allowed:
        raise ValueError(f"{name} must be {' or '.join(f'{d}-D' for d in allowed)}, "
                         f"got shape {tuple(t.shape)}")


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: all factors must "
                        f"share the input's dtype")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major); got strides {t.stride()} "
                         f"for shape {tuple(t.shape)}: call .contiguous() or use the nn modules, "
                         f"which store contiguous factors")


def check_cur_linear_args(x, C, U, R, bias, rows) -> None:
    """Shapes: x (..., n); R (r, n), or base weight W (k, n) with rows (r,); U (c, r), (r,) or
    None (then c = r); C (m, c); bias (m,)."""
    _check_tensor("x", x, tuple(range(1, 9)))
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 (or float64 on the torch "
                        f"backend), got {x.dtype}")
    _check_tensor("C", C, 2)
    _check_tensor("R", R, 2)
    for name, t in (("C", C), ("R", R)):
        _check_like(name, t, x)
    n = x.shape[-1]
    if R.shape[1] != n:
        raise ValueError(f"R must have x.shape[-1] = {n} columns (R is r×n), got {tuple(R.shape)}")
    if rows is not None:
        _check_tensor("rows", rows, 1)
        if rows.dtype != torch.int64:
            raise TypeError(f"rows must be int64 indices into the base weight, got {rows.dtype}")
        if rows.device != x.device:
            raise ValueError(f"rows is on {rows.device} but x is on {x.device}")
        r = rows.shape[0]
    else:
        r = R.shape[0]
    if r == 0:
        raise ValueError("the rank must be at least 1 (R/rows is empty)")
    c = C.shape[1]
    if U is None:
        if c != r:
            raise ValueError(f"without U, C must have r = {r} columns, got {tuple(C.shape)}")
    else:
        _check_tensor("U", U, (1, 2))
        _check_like("U", U, x)
        expected = (r,) if U.dim() == 1 else (c, r)
        if U.dim() == 1 and c != r:
            raise ValueError(f"a diagonal U needs C with r = {r} columns, got {tuple(C.shape)}")
        if tuple(U.shape) != expected:
            raise ValueError(f"U must have shape {expected} (C has {c} columns, R has {r} rows), "
                             f"got {tuple(U.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        _check_like("bias", bias, x)
        if bias.shape[0] != C.shape[0]:
            raise ValueError(f"bias must have m = {C.shape[0]} entries, got {tuple(bias.shape)}")


def check_input(x, C, R) -> None:
    """x must fit factors validated once (modules); raises, naming what does not fit."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != R.shape[1]:
        raise ValueError(f"x must have R's {R.shape[1]} features in its last dimension, got "
                         f"shape {tuple(x.shape)}")
    if x.dtype != C.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the factors have {C.dtype}")
    if x.device != C.device:
        raise ValueError(f"x is on {x.device} but the factors are on {C.device}")


def check_rows_in_range(rows: torch.Tensor, num_base_rows: int) -> None:
    """Host-side bound check of gather indices (one device sync; modules do it once at load)."""
    if rows.numel() == 0:
        return
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= num_base_rows:
        raise IndexError(f"rows must index the base weight's {num_base_rows} rows, "
                         f"got values in [{low}, {high}]")
