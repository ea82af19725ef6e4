"""`load_compressed`: a curkernels folder back into a model with factored modules."""

import json
import os
from pathlib import Path

import torch
import transformers

from ..models import model_class_for
from .errors import CheckpointError
from .module_specs import check_compression_config
from .tensor_checks import check_files_inside, check_inside


def read_compression_config(folder: str | os.PathLike) -> dict:
    """The folder's checked `compression_config` block (CheckpointError naming what is
    wrong)."""
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
    return check_compression_config(config.get("compression_config"))


def load_compressed(folder: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, **kwargs):
    """Load a folder written by `save_compressed`.

    The model is built on the meta device with factored modules in place and the weights load
    straight into them, onto `device` (default CPU) in `dtype` (default: as saved).
    """
    read_compression_config(folder)  # a clear error before transformers sees the folder
    check_files_inside(Path(folder))
    cls = model_class_for(transformers.AutoConfig.from_pretrained(folder))
    if device is not None:
        kwargs["device_map"] = str(torch.device(device))
    model = cls.from_pretrained(folder, dtype=dtype if dtype is not None else "auto", **kwargs)
    return model.eval()
