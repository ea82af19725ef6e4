"""Next-token quality of a causal LM on a text, by sliding windows (as the transformers guide):
perplexity, and top-1 agreement with a reference model on the same positions."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class NextTokenScores:
    """What one pass over a token sequence measured: the summed next-token NLL, how many
    positions were scored, and the model's top-1 prediction at each of them (in order)."""
    nll: float
    count: int
    predictions: torch.Tensor

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.count)

    def agreement(self, reference: "NextTokenScores") -> float:
        """Fraction of scored positions where the top-1 prediction equals `reference`'s."""
        if reference.predictions.shape != self.predictions.shape:
            raise ValueError(f"reference scored {reference.predictions.numel()} positions, "
                             f"these scores {self.predictions.numel()}: score the same tokens "
                             f"with the same window and stride")
        return float((self.predictions == reference.predictions).double().mean())


def check_windows(window: int, stride: int) -> None:
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride ≤ window, got stride={stride}, window={window}")


def text_token_ids(tokenizer, text: str | Path, max_tokens: int | None = None) -> torch.Tensor:
    """The token ids of `text` (a string, or a path to a text file), cut to `max_tokens`."""
    what = "text"
    if isinstance(text, Path) or (isinstance(text, str) and "\n" not in text
                                  and Path(text).is_file()):
        what = f"text file {str(text)!r}"
        text = Path(text).read_text(encoding="utf-8")
    if not text.strip():  # a tokenizer's special tokens alone would still be "scored"
        raise ValueError(f"{what} is empty: perplexity needs text to score")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids if max_tokens is None else ids[:max_tokens]


@torch.no_grad()
def score_next_tokens(model: nn.Module, ids: torch.Tensor, *, window: int = 1024,
                      stride: int = 512) -> NextTokenScores:
    """Score every token of `ids` (1-D) but the first: each window of `window` tokens advances
    by `stride`, and only its last `stride` tokens (those not scored by the previous window)
    are scored, each with up to window − 1 tokens of context. stride = window gives
    consecutive, non-overlapping windows (the first token of each is context only)."""
    check_windows(window, stride)
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"ids must be 1-D with at least two tokens, got shape "
                         f"{tuple(ids.shape)}")
    device = next(model.parameters()).device
    total_nll, scored, previous_end, predictions = 0.0, 0, 0, []
    for begin in tqdm(range(0, ids.numel(), stride), desc="next-token scores", leave=False):
        end = min(begin + window, ids.numel())
        chunk = ids[begin:end].to(device)[None]
        fresh = min(end - previous_end, chunk.shape[1] - 1)  # positions scored first here
        logits = model(input_ids=chunk).logits[0, -fresh - 1:-1].float()
        total_nll += float(nn.functional.cross_entropy(logits, chunk[0, -fresh:],
                                                       reduction="sum"))
        predictions.append(logits.argmax(dim=-1).cpu())
        scored += fresh
        previous_end = end
        if end == ids.numel():
            break
    return NextTokenScores(total_nll, scored, torch.cat(predictions))


def perplexity(model: nn.Module, tokenizer, text: str | Path, *, window: int = 1024,
               stride: int = 512, max_tokens: int | None = None) -> float:
    """exp(mean next-token NLL) over `text` (a string, or a path to a text file), scored as
    `score_next_tokens` does."""
    check_windows(window, stride)
    ids = text_token_ids(tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise ValueError("text must hold at least two tokens")
    return score_next_tokens(model, ids, window=window, stride=stride).perplexity


def top1_agreement(model: nn.Module, reference: nn.Module, tokenizer, text: str | Path, *,
                   window: int = 1024, stride: int = 512, max_tokens: int | None = None
                   ) -> float:
    """Fraction of the positions of `text` where `model`'s most likely next token is
    `reference`'s (e.g. a compressed model against its dense original)."""
    check_windows(window, stride)
    ids = text_token_ids(tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise ValueError("text must hold at least two tokens")
    scores = score_next_tokens(model, ids, window=window, stride=stride)
    return scores.agreement(score_next_tokens(reference, ids, window=window, stride=stride))
