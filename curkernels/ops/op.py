"""The public op `cur_linear` (y = ((x·Rᵀ)·Uᵀ)·Cᵀ + b) and the sibling-group op: checks, eager
fast path, and their torch.library registration (fake implementations, autograd).

`torch.ops.curkernels.cur_linear` and `torch.ops.curkernels.shared_group` are what torch.compile
and autograd see: opaque to the compiler (a fake implementation gives the output's shape), the
backend chosen when the op runs (dispatch.py). `cur_linear` carries its own backward, computed
with torch ops: the factored product's gradients are three small GEMMs each, and training
(healing U) is not the hot path. Eager inference skips the custom-op machinery (autograd wrapper,
dispatcher round trip): its per-call host cost is the same order as a decode kernel's runtime,
so that path is written for host time: the memoized choice is looked up under a key built inline
from this very call (a replaced, moved or recast factor makes another key, never a stale hit).
"""

import math
import typing

import torch

from .dispatch import choices, group_choice, resolve, stream_capturing
from .tables import DECODE_MAX_ROWS

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


def run_cur_linear(x: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None, R: torch.Tensor,
                   bias: torch.Tensor | None, rows: torch.Tensor | None,
                   backend: str) -> torch.Tensor:
    """Check x against the factors (a kernel must never read past it), look the backend up
    (dispatch.resolve on a miss) and run it; x keeps its leading dimensions, and is made
    contiguous for the backends that need it."""
    x_shape = x.shape
    if not x_shape or x_shape[-1] != R.shape[1] or x.dtype != C.dtype or x.device != C.device:
        check_input(x, C, R)
    num_rows = x_shape[0] if len(x_shape) == 2 else math.prod(x_shape[:-1])
    r = (R if rows is None else rows).shape[0]
    # dispatch.choices' key; a capture is asked about only for CUDA decode calls
    if num_rows > DECODE_MAX_ROWS:
        key = (backend, x.device, x.dtype, DECODE_MAX_ROWS + 1, False, C.shape[0], x_shape[-1],
               r, U is not None)
    else:
        key = (backend, x.device, x.dtype, num_rows, x.is_cuda and stream_capturing(),
               C.shape[0], x_shape[-1], r, U is not None)
    function, contiguous_only, before = choices.get(key) or resolve(key)
    if before is not None:
        before()
    if contiguous_only and not x.is_contiguous():
        x = x.contiguous()
    return function(x, C, U, R, bias, rows)


@torch.library.custom_op("curkernels::cur_linear", mutates_args=())
def cur_linear_op(x: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None, R: torch.Tensor,
                  bias: torch.Tensor | None, rows: torch.Tensor | None,
                  backend: str) -> torch.Tensor:
    # The backend is resolved here, at run time, not while torch.compile traces: dispatch
    # asks which backends can run and whether a CUDA graph is being captured.
    return run_cur_linear(x, C, U, R, bias, rows, backend)


@cur_linear_op.register_fake
def _cur_linear_fake(x, C, U, R, bias, rows, backend):
    return x.new_empty((*x.shape[:-1], C.shape[0]))


def _setup_context(ctx, inputs, output):
    x, C, U, R, bias, rows, _backend = inputs
    ctx.save_for_backward(x, C, U, R, rows)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, C, U, R, rows = ctx.saved_tensors
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    factor_R = R.index_select(0, rows) if rows is not None else R
    x2d = x.reshape(-1, x.shape[-1]).to(compute)
    g = grad_y.reshape(-1, grad_y.shape[-1]).to(compute)
    Cc, Rc = C.to(compute), factor_R.to(compute)
    t = x2d @ Rc.t()
    if U is None:
        s = t
    elif U.dim() == 1:
        s = t * U.to(compute)
    else:
        s = t @ U.to(compute).t()
    grad_s = g @ Cc
    grad_C = g.t() @ s if ctx.needs_input_grad[1] else None
    grad_U = None
    if U is None:
        grad_t = grad_s
    elif U.dim() == 1:
        grad_t = grad_s * U.to(compute)
        grad_U = (grad_s * t).sum(0) if ctx.needs_input_grad[2] else None
    else:
        grad_t = grad_s @ U.to(compute)
        grad_U = grad_s.t() @ t if ctx.needs_input_grad[2] else None
    grad_x = (grad_t @ Rc).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_R = None
    if ctx.needs_input_grad[3]:
        grad_factor = grad_t.t() @ x2d
        grad_R = (torch.zeros(R.shape, dtype=compute, device=R.device).index_add_(0, rows,
                  grad_factor) if rows is not None else grad_factor)
    grad_bias = g.sum(0).to(x.dtype) if ctx.has_bias and ctx.needs_input_grad[4] else None

    def cast(grad, like):
        return None if grad is None else grad.to(like.dtype)

    return (grad_x, cast(grad_C, C), cast(grad_U, U), cast(grad_R, R), grad_bias, None, None)


cur_linear_op.register_autograd(_backward, setup_context=_setup_context)


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


def shared_group(x: torch.Tensor, weight: torch.Tensor, expands: list[torch.Tensor],
                 biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The outputs [(x·weightᵀ)[..., cols_i]·expands[i]ᵀ + b_i] of a sibling group's members
    (curkernels.nn.share_input_shrinks), member i's columns being the next expands[i].shape[1]
    of the product, by the way dispatch picks (one group launch or the shared chain). The
    caller has checked x against the factors."""
    num_rows = math.prod(x.shape[:-1])
    uniform_bias = len({bias is None for bias in biases}) == 1
    members = tuple((C.shape[0], C.shape[1]) for C in expands)
    _, function = group_choice(x, num_rows, members, x.is_cuda and stream_capturing(),
                               uniform_bias)
    return function(x, weight, expands, biases)


# typing.List, not list: torch 2.5's schema inference knows only typing's generics
@torch.library.custom_op("curkernels::shared_group", mutates_args=())
def shared_group_op(x: torch.Tensor, weight: torch.Tensor,
                    expands: typing.List[torch.Tensor],  # noqa: UP006
                    biases: typing.List[torch.Tensor | None],  # noqa: UP006
                    ) -> typing.List[torch.Tensor]:  # noqa: UP006
    # The way is chosen here, when the op runs, not while torch.compile traces.
    return shared_group(x, weight, expands, biases)


@shared_group_op.register_fake
def _shared_group_fake(x, weight, expands, biases):
    return [x.new_empty((*x.shape[:-1], C.shape[0])) for C in expands]
