"""Put the factored modules a checkpoint describes into a freshly built (meta) model, and set
their CUR indices after loading."""

import torch
from torch import nn

from .errors import CheckpointError
from .module_specs import build_module


def apply_compression_config(model: nn.Module, block: dict) -> None:
    """Swap each named `nn.Linear` for an empty factored module of the same dtype/device.

    `block` is checked (`check_compression_config`); here each spec must also fit the Linear
    it replaces: its shape. The bias is the spec's own (ROM gives a layer without one a bias;
    the tensor checks then require it in the weights).
    """
    for name, spec in block["modules"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"compression_config names module {name!r}, which this model "
                                  f"({type(model).__name__}) does not have") from None
        shape = (spec["out_features"], spec["in_features"])
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != shape:
            raise CheckpointError(f"compression_config describes {name!r} as a {shape[0]}×"
                                  f"{shape[1]} Linear, but the model has {linear!r}")
        model.set_submodule(name, build_module(spec, linear.weight.dtype, linear.weight.device))


def restore_indices(model: nn.Module, block: dict) -> None:
    """Set CUR index buffers from the config, beside each module's factors.

    They are not in the state dict, and transformers materialises buffers it did not load as
    uninitialised memory, so the config (checked before loading: in range, distinct, the
    right count) is their source of truth after loading.
    """
    for name, spec in block["modules"].items():
        module = model.get_submodule(name)
        for buffer in ("row_indices", "col_indices"):
            if spec.get(buffer) is not None:
                device = next(module.parameters()).device
                setattr(module, buffer, torch.tensor(spec[buffer], dtype=torch.int64,
                                                     device=device))
