"""`load_compressed`: a curkernels folder back into a model with factored modules."""

import json
import os
from pathlib import Path

import torch
import transformers

from .checkpoint_files import check_files_inside, check_inside
from .errors import CheckpointError
from .module_specs import check_compression_config
from .plain_guard import GUARD_FIELD


def model_class_for(config) -> type:
    """The class config.json names (e.g. LlamaForCausalLM, BertModel), else AutoModel."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a model folder")
    check_inside(folder, [path])
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def read_compression_config(folder: str | os.PathLike) -> dict:
    """The folder's checked `compression_config` block (CheckpointError naming what is
    wrong)."""
    return check_compression_config(_read_config(folder).get("compression_config"))


def load_compressed(folder: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, **kwargs):
    """Load a folder written by `save_compressed`.

    The model is built on the meta device with factored modules in place and the weights load
    straight into them, onto `device` (default CPU) in `dtype` (default: as saved).
    """
    config = _read_config(folder)
    check_compression_config(config.get("compression_config"))  # before transformers reads it
    check_files_inside(Path(folder))
    if GUARD_FIELD in config:  # transformers 4.x reads it before any curkernels hook runs
        kwargs.setdefault(GUARD_FIELD, None)
    cls = model_class_for(transformers.AutoConfig.from_pretrained(folder))
    if device is not None:
        kwargs["device_map"] = str(torch.device(device))
    model = cls.from_pretrained(folder, dtype=dtype if dtype is not None else "auto", **kwargs)
    return model.eval()
