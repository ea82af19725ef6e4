"""`FrequentTokenHead`: a draft head that scores only the K most frequent tokens (FR-Spec).

The head's weight is the dense model's own (embedding or LM head), never copied: each call
reads the K kept rows. Tokens outside the subset get logit -inf, so the draft never proposes
them; the target's verification still covers the whole vocabulary, so output is unchanged.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class FrequentTokenHead(nn.Module):
    """logits[..., ids] = x·W[ids]ᵀ (+ b[ids]), -inf elsewhere; W (V×d) is shared, not owned."""

    def __init__(self, weight: torch.Tensor, token_ids, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be (vocab, hidden), got {tuple(weight.shape)}")
        ids = torch.as_tensor(token_ids, dtype=torch.int64, device=weight.device).reshape(-1)
        vocab = weight.shape[0]
        if ids.numel() == 0 or ids.unique().numel() != ids.numel():
            raise ValueError("token_ids must be non-empty and must not repeat a token")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token_ids must lie in [0, {vocab}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("token_ids", ids.sort().values, persistent=False)
        self.in_features, self.out_features = weight.shape[1], vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.index_select(0, self.token_ids)
        subset = F.linear(x, self.weight.index_select(0, self.token_ids), bias)
        logits = subset.new_full((*subset.shape[:-1], self.out_features), float("-inf"))
        return logits.index_copy(-1, self.token_ids, subset)

    def extra_repr(self) -> str:
        return f"tokens={self.token_ids.numel()} of {self.out_features}"


def most_frequent_tokens(batches: Iterable[dict], vocab_size: int, count: int) -> torch.Tensor:
    """The `count` token ids seen most often in the batches' real (unmasked) tokens; ties and
    unseen tokens are broken by id, so every count up to the vocabulary works."""
    if not 1 <= count <= vocab_size:
        raise ValueError(f"head_tokens must be in [1, {vocab_size}] (the vocabulary), got "
                         f"{count}")
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for batch in batches:
        ids = batch["input_ids"].cpu()
        mask = batch.get("attention_mask")
        ids = ids[mask.cpu().bool()] if mask is not None else ids.reshape(-1)
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    # stable sort on -counts: equal counts keep ascending id order
    return torch.sort(torch.argsort(-counts, stable=True)[:count]).values
