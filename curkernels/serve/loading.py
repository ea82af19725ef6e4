"""`load_for_inference`: a model by the one loader (`load_model`), frozen for serving."""

import os

import torch

from ..checkpoint import load_model
from ..nn import prepare_for_inference


def load_for_inference(reference: str | os.PathLike, device: str | torch.device | None = None,
                       dtype: torch.dtype | None = None, tokenizer: str | None = None,
                       fold: bool = True, share_shrinks: bool = False):
    """(model, tokenizer) for any reference `curkernels.checkpoint.load_model` takes (a
    compressed checkpoint, a dense folder, a GGUF, a bundled name), the model frozen by
    `curkernels.nn.prepare_for_inference` (links folded unless `fold=False`; sibling
    projections sharing one stacked shrink factor with `share_shrinks=True`).

    `device` defaults to cuda when available. The tokenizer comes from `tokenizer` (a folder
    or hub name) when given, else from the model's folder, which must then hold one.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, loaded = load_model(reference, device=device, dtype=dtype, tokenizer=tokenizer)
    if loaded is None:
        raise FileNotFoundError(f"no tokenizer in {reference}: save the checkpoint with "
                                f"save_compressed(..., tokenizer=...) or pass tokenizer=")
    return prepare_for_inference(model, fold=fold, share_shrinks=share_shrinks), loaded
