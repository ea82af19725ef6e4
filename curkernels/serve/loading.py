"""Load a compressed checkpoint folder and its tokenizer for inference."""

import argparse
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


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of `load_from_arguments`: the checkpoint folder and how to load
    and run it (shared by the example programs in python/)."""
    parser.add_argument("checkpoint", help="folder written by curkernels.save_compressed")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--share-shrinks", action="store_true",
                        help="factored q/k/v and gate/up read their stacked shrink factors in one "
                             "pass (curkernels.nn.share_input_shrinks)")
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's")


def load_from_arguments(args: argparse.Namespace):
    """(model, tokenizer) as the options of `add_loading_arguments` say."""
    return load_for_inference(args.checkpoint, args.device, parse_dtype(args.dtype),
                              args.tokenizer, share_shrinks=args.share_shrinks)
