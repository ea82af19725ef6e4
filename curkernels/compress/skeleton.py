"""A checkpoint folder's model built without its weights (parameters on the meta device,
buffers real), whose modules are filled from the shards and emptied again one at a time."""

import os

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from ..checkpoint.load import model_class_for
from .calibration import all_finite
from .shard_reader import ShardReader


def checkpoint_dtype(config, reader: ShardReader) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` picks: the config's, else the first floating
    tensor's."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    for name in reader.names:
        tensor = reader.tensors([name])[name]
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def empty_model(folder: str | os.PathLike, reader: ShardReader,
                dtype: torch.dtype | None = None) -> nn.Module:
    """The model class config.json names, in eval mode, with every parameter on the meta
    device (no memory) and its buffers (rotary frequencies) computed as usual."""
    config = transformers.AutoConfig.from_pretrained(folder)
    if getattr(config, "compression_config", None):
        raise ValueError(f"{folder} is already a curkernels checkpoint: load it with "
                         f"curkernels.load_compressed")
    dtype = dtype if dtype is not None else checkpoint_dtype(config, reader)
    cls = model_class_for(config)
    with init_empty_weights(include_buffers=False):
        model = (cls.from_config(config, dtype=dtype) if cls is transformers.AutoModel
                 else cls._from_config(config, dtype=dtype))
    model.tie_weights()  # tied copies (an LM head sharing the embedding) are stored once
    return model.eval()


def fill(module: nn.Module, prefix: str, reader: ShardReader) -> None:
    """Load `module`'s parameters and persistent buffers (named `prefix` + their local name
    in the shards) into it, each cast to the dtype the empty model gave it. A NaN/Inf weight
    is refused as `compress` refuses it."""
    wanted = module.state_dict(keep_vars=True)
    loaded = reader.tensors(prefix + name for name in wanted)
    state = {}
    for name, empty in wanted.items():
        tensor = loaded[prefix + name]
        if tuple(tensor.shape) != tuple(empty.shape):
            raise ValueError(f"{reader.folder}: tensor {prefix + name!r} has shape "
                             f"{tuple(tensor.shape)}, the model's config expects "
                             f"{tuple(empty.shape)}")
        tensor = tensor.to(empty.dtype)
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ValueError(f"the model's parameter {prefix + name!r} holds NaN or Inf: cannot "
                             f"compress a model with non-finite weights")
        state[name] = tensor
    module.load_state_dict(state, assign=True, strict=True)


def release(module: nn.Module) -> None:
    """Free `module`'s tensors: back onto the meta device."""
    module.to("meta")
