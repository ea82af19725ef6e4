"""Put the factored modules a checkpoint describes into a freshly built (meta) model, and
check the checkpoint's tensors against them before any weight is read."""

import os

import torch
from safetensors import safe_open
from torch import nn

from .module_specs import CheckpointError, build_module, expected_tensor_shapes


def apply_compression_config(model: nn.Module, block: dict) -> None:
    """Swap each named `nn.Linear` for an empty factored module of the same dtype/device."""
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


def checkpoint_tensor_shapes(files) -> dict[str, tuple[int, ...]]:
    """Names and shapes from safetensors headers (no tensor data is read)."""
    shapes = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(f"{os.path.basename(file)}: curkernels checkpoints hold "
                                  f"safetensors only (no pickle)")
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc
    return shapes


def check_checkpoint_tensors(model: nn.Module, block: dict, files) -> None:
    """Every factor present with its expected shape; nothing unknown; other shapes match."""
    stored = checkpoint_tensor_shapes(files)
    for name, spec in block["modules"].items():
        for tensor, shape in expected_tensor_shapes(spec).items():
            key = f"{name}.{tensor}"
            if key not in stored:
                raise CheckpointError(f"checkpoint lacks tensor {key!r} (expected shape {shape})")
            if stored[key] != shape:
                raise CheckpointError(f"tensor {key!r} has shape {stored[key]}, expected {shape}")
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise CheckpointError(f"checkpoint holds tensors the compressed model does not have: "
                              f"{unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    for key, shape in stored.items():
        if expected[key] != shape:
            raise CheckpointError(f"tensor {key!r} has shape {shape}, expected {expected[key]}")


def restore_indices(model: nn.Module, block: dict) -> None:
    """Set CUR index buffers from the config, beside each module's factors.

    They are not in the state dict, and transformers materialises buffers it did not load as
    uninitialised memory, so the config is their source of truth after loading.
    """
    for name, spec in block["modules"].items():
        module = model.get_submodule(name)
        for buffer in ("row_indices", "col_indices"):
            if spec.get(buffer) is not None:
                device = next(module.parameters()).device
                setattr(module, buffer, torch.tensor(spec[buffer], dtype=torch.int64,
                                                     device=device))
