"""Pick the next token from logits: greedy, temperature, nucleus (top-p)."""

import torch


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be ≥ 0 (0 is greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def token_probabilities(logits: torch.Tensor, temperature: float, top_p: float = 1.0
                        ) -> torch.Tensor:
    """(..., V) logits → the (..., V) float32 distribution that temperature > 0 and nucleus
    (top-p) sampling draw from."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits → (B,) int64 tokens. temperature 0 is greedy (argmax)."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = token_probabilities(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
