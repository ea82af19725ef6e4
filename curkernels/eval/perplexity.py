"""Perplexity of a causal LM on a text, by sliding windows (as the transformers guide)."""

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text: str | Path, *, window: int = 1024,
               stride: int = 512, max_tokens: int | None = None) -> float:
    """exp(mean next-token NLL) over `text` (a string, or a path to a text file). Each window
    of `window` tokens advances by `stride`; only its last `stride` tokens (those not scored
    by the previous window) are scored, each with up to window − 1 tokens of context."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride ≤ window, got stride={stride}, window={window}")
    what = "text"
    if isinstance(text, Path) or (isinstance(text, str) and "\n" not in text
                                  and Path(text).is_file()):
        what = f"text file {str(text)!r}"
        text = Path(text).read_text(encoding="utf-8")
    if not text.strip():  # a tokenizer's special tokens alone would still be "scored"
        raise ValueError(f"{what} is empty: perplexity needs text to score")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("text must hold at least two tokens")
    device = next(model.parameters()).device
    total_nll, scored, previous_end = 0.0, 0, 0
    for begin in tqdm(range(0, ids.numel(), stride), desc="perplexity", leave=False):
        end = min(begin + window, ids.numel())
        chunk = ids[begin:end].to(device)[None]
        labels = chunk.clone()
        fresh = end - previous_end  # tokens this window scores for the first time
        labels[:, :-fresh] = -100
        logits = model(input_ids=chunk).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                          reduction="sum")
        count = int((labels[0, 1:] != -100).sum())
        total_nll += float(nll)
        scored += count
        previous_end = end
        if end == ids.numel():
            break
    return math.exp(total_nll / scored)
