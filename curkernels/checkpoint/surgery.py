"""Put the factored modules a checkpoint describes into a freshly built (meta) model, and finish
them after loading (parameter names, CUR indices)."""

import torch
from torch import nn

from .errors import CheckpointError
from .module_specs import build_module, stored_names


def apply_compression_config(model: nn.Module, block: dict) -> None:
    """Swap each named `nn.Linear` for an empty factored module of the same dtype/device.

    `block` is checked (`check_compression_config`); here each spec must also fit the Linear
    it replaces: its shape. The bias is the spec's own (ROM gives a layer without one a bias;
    the tensor checks then require it in the weights). A parameter that the checkpoint stores
    under another name (an old two-factor layer's C and R as A and B) takes that name until
    `finish_loading`, so that the weights load into it by name.
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
        module = build_module(spec, linear.weight.dtype, linear.weight.device)
        for parameter, stored in stored_names(spec).items():
            module.register_parameter(stored, module._parameters.pop(parameter))
        model.set_submodule(name, module)


def finish_loading(model: nn.Module, block: dict) -> None:
    """Give back the parameters their own names, and set CUR index buffers from the config.

    The index buffers are not in the state dict, and transformers materialises buffers it did
    not load as uninitialised memory, so the config (checked before loading: in range,
    distinct, the right count) is their source of truth after loading.
    """
    for name, spec in block["modules"].items():
        module = model.get_submodule(name)
        for parameter, stored in stored_names(spec).items():
            module.register_parameter(parameter, module._parameters.pop(stored))
        for buffer in ("row_indices", "col_indices"):
            if spec.get(buffer) is not None:
                device = next(module.parameters()).device
                setattr(module, buffer, torch.tensor(spec[buffer], dtype=torch.int64,
                                                     device=device))
