"""Load a compressed checkpoint folder and its tokenizer for inference."""

import os

import torch
import transformers

from ..checkpoint import load_compressed
from ..nn import prepare_for_inference

DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype | None:
    """A command-line dtype name; 'auto' (None) keeps the checkpoint's dtype."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(folder: str | os.PathLike, device: str | torch.device | None = None,
                       dtype: torch.dtype | None = None, tokenizer: str | None = None,
                       fold: bool = True, share_shrinks: bool = False):
    """(model, tokenizer) from a folder written by `curkernels.save_compressed`, the model
    frozen by `curkernels.nn.prepare_for_inference` (links folded unless `fold=False`;
    sibling projections sharing one stacked shrink factor with `share_shrinks=True`).

    The tokenizer comes from `tokenizer` (a folder or hub name) when given, else from the
    checkpoint folder, which must then hold one.
    """
    model = prepare_for_inference(
        load_compressed(folder, device=device or default_device(), dtype=dtype), fold=fold,
        share_shrinks=share_shrinks)
    source = tokenizer or folder
    try:
        loaded = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no tokenizer in {source}: save the checkpoint with "
                                f"save_compressed(..., tokenizer=...) or pass tokenizer=") from exc
    return model, loaded
