"""Load a dense transformers model (and its tokenizer) by folder, GGUF file or hub name."""

from pathlib import Path

import torch
import transformers
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.tokenization_utils_base import FULL_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE

from .checkpoint.gguf import find_gguf, materialize_gguf
from .checkpoint.load import model_class_for


def load_dense_model(name_or_path: str, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer or None when the folder ships none). A GGUF file, or a
    folder holding one, loads from its cached transformers folder (`materialize_gguf`)."""
    gguf_file = find_gguf(name_or_path)
    if gguf_file is not None:
        name_or_path = str(materialize_gguf(gguf_file))
    config = read_model_config(name_or_path)
    if getattr(config, "compression_config", None):
        raise ValueError(f"{name_or_path} is already a curkernels checkpoint: load it with "
                         f"curkernels.load_compressed")
    model = model_class_for(config).from_pretrained(
        name_or_path, dtype=dtype if dtype is not None else "auto").to(device).eval()
    return model, tokenizer_if_shipped(name_or_path)


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
