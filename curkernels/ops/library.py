"""`torch.ops.curkernels.cur_linear`: the custom op that torch.compile and autograd see.

The op is opaque to the compiler (a fake implementation gives the output's shape) and carries
its own backward, computed with torch ops: the factored product's gradients are three small
GEMMs each, and training (healing U) is not the hot path.
"""

import torch

from .execute import run_cur_linear


@torch.library.custom_op("curkernels::cur_linear", mutates_args=())
def cur_linear_op(x: torch.Tensor, C: torch.Tensor, U: torch.Tensor | None, R: torch.Tensor,
                  bias: torch.Tensor | None, rows: torch.Tensor | None,
                  backend: str) -> torch.Tensor:
    # The backend is resolved here, at run time, not while torch.compile traces: dispatch
    # asks which backends can run and whether a CUDA graph is being captured.
    return run_cur_linear(x, C, U, R, bias, rows, backend)


@cur_linear_op.register_fake
def _(x, C, U, R, bias, rows, backend):
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
