"""Put a compressed model in the form that serving wants: frozen, links folded, workspaces made."""

from torch import nn

from ..ops.dispatch import reserve_decode_workspaces
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
    - Where the Triton decode kernel may run a two-factor layer or group (a CUDA model with
      backend 'auto' or 'triton'; on the CPU under TRITON_INTERPRET=1, 'triton'), its kept
      workspaces for every decode row block (1,344·r bytes for rank r, shared by the layers
      of one rank) are made now on the current stream: serving calls on that stream then
      find them by a list index, and a CUDA graph captured there keeps them.
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
    _reserve_workspaces(model)
    return model


def _reserve_workspaces(model: nn.Module) -> None:
    """The decode workspaces of every two-factor layer, and of every sibling group (whose
    members may also run alone), once per (backend, device, rank)."""
    wanted = {}
    for module in model.modules():
        if not isinstance(module, CURLinear) or module.U is not None:
            continue  # a link left unfolded takes the keyed lookup (its width is not the rank)
        wanted[module.backend, module.C.device, module.rank] = None
        shared = module.shared_shrink
        if shared is not None:
            wanted["auto", shared.weight.device, shared.weight.shape[0]] = None
    for backend, device, rank in wanted:
        reserve_decode_workspaces(backend, device, rank)
