"""Put a compressed model in the form that serving wants: frozen, links folded."""

from torch import nn

from .cur_linear import CURLinear
from .shared_shrink import share_input_shrinks


def prepare_for_inference(model: nn.Module, *, fold: bool = True,
                          share_shrinks: bool = False) -> nn.Module:
    """Freeze `model` for serving, in place, and return it.

    - `eval()` and `requires_grad_(False)`: no autograd bookkeeping per call.
    - With `fold`, every `CURLinear` with a link U (full or diagonal) gets C ← C·U (fp64,
      cast back): one stage and the r×r link fewer per call. Under torch.compile and CUDA
      graphs that matters most, because the per-call auto-fold of a frozen U is skipped while
      compiling; the fused kernels then run the two-factor form. The folded C no longer holds
      columns of W, so CUR interpretability (`col_indices`) is given up; outputs change only
      by the rounding of C·U to the model's dtype.
    - With `share_shrinks`, factored q/k/v and gate/up siblings share one stacked shrink
      factor (`share_input_shrinks`): decode on a GPU then runs one Triton launch a group
      where the GPU's group table measured it faster (ops/tables.py), elsewhere the
      cuBLAS chain with one shrink GEMM a group.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model.eval()
    model.requires_grad_(False)
    if fold:
        for module in model.modules():
            if isinstance(module, CURLinear):
                module.fold()  # the new C keeps the old one's requires_grad (False)
    if share_shrinks:
        share_input_shrinks(model)
    return model
