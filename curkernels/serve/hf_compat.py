"""The transformers details that moved between 5.x releases, kept in one place.

Earlier 5.x releases name the cache argument `past_key_values` and place new keys/values by a
`cache_position` argument; later ones name it `cache` and count positions inside the cache.
Both accept `position_ids`, which the serving path always passes.
"""

import inspect

import torch
from torch import nn
from transformers import StaticCache


class CachedForwardArguments:
    """Builds the keyword arguments that feed a cache and the absolute positions of the new
    tokens to `model.forward`, for the installed transformers. The signature is read once
    here: `inspect` inside a compiled region would break the graph."""

    def __init__(self, model: nn.Module):
        parameters = set(inspect.signature(model.forward).parameters)
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.takes_cache_position = "cache_position" in parameters
        self.takes_logits_to_keep = "logits_to_keep" in parameters

    def __call__(self, cache: StaticCache, positions: torch.Tensor) -> dict:
        """`positions`: (L,) int64 positions of the L new tokens."""
        kwargs = {self.cache_name: cache, "position_ids": positions.unsqueeze(0),
                  "use_cache": True}
        if self.takes_cache_position:
            kwargs["cache_position"] = positions
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1  # only the last position's logits are sampled from
        return kwargs


def key_value_shape(model: nn.Module) -> tuple[int, int]:
    """(key/value heads, head dim) of the decoder's attention layers."""
    text = model.config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return heads, head_dim


def new_static_cache(model: nn.Module, batch_size: int, max_cache_len: int) -> StaticCache:
    """A StaticCache for `model`, allocated now on the model's device and dtype, so that its
    buffers have fixed addresses before any compiled step (CUDA graphs need that)."""
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    heads, head_dim = key_value_shape(model)
    cache.early_initialization(batch_size=batch_size, num_heads=heads, head_dim=head_dim,
                               dtype=model.dtype, device=model.device)
    return cache


def cache_bytes(cache: StaticCache) -> int:
    """Bytes held by the cache's key and value buffers."""
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if t is not None)


def truncate_cache(cache: StaticCache, length: int) -> None:
    """Keep the first `length` positions of a static cache (speculative decoding drops the
    rejected tail). Releases that count positions inside the cache get their counters set in
    place (their addresses stay, as CUDA graphs need); releases placed by `cache_position`
    need nothing: the next tokens overwrite the tail, which the causal mask hides until then."""
    for layer in cache.layers:
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)
