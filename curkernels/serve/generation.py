"""Static-KV-cache generation, eager or compiled (torch.compile + CUDA graphs on GPU).

Eager transformers decoding is host-bound: a dynamic cache changes every tensor shape each
step, so nothing can be captured once and replayed. Here the KV cache is preallocated at a
fixed length, every decode step has the same shapes, and the whole model forward compiles
into one graph (`fullgraph=True`: a graph break, e.g. from a curkernels op, is an error rather
than a silent slowdown) that CUDA graphs replay with one launch per token.
"""

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .hf_compat import CachedForwardArguments, new_static_cache
from .sampling import check_sampling, sample_next_token


def end_of_sequence_ids(model: nn.Module, tokenizer=None) -> set[int]:
    """The ids that end a generation: the model's generation config and the tokenizer's."""
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids


class StaticCacheGenerator:
    """Prefill a prompt, then decode token by token over a preallocated KV cache.

    Args:
        model: a transformers causal LM (dense or compressed), in eval mode.
        batch_size: rows per call; prompts in a batch share one length (no padding).
        max_seq_len: prompt plus generated tokens, the cache length.
        compile: compile the decode step with `fullgraph=True`; on CUDA in
            `mode="reduce-overhead"` (CUDA graphs) unless `mode` says otherwise.
        compile_prefill: compile the prefill too (one graph per prompt length until torch
            switches to a dynamic-shape graph; no CUDA graphs).
        mode, compile_backend: passed to torch.compile.
        prefill_chunk_tokens: the most prompt tokens (all rows together) one prefill forward
            takes; longer prompts run in chunks of positions, as serving engines' chunked
            prefill does, so activation memory stays bounded by the chunk (a batch-32 prompt
            of 512 tokens holds 16k tokens' activations at once otherwise). None: one forward.

    Generators over models of one structure share compiled graphs; each other structure or
    shape adds a graph to the same step function, up to torch._dynamo.config.recompile_limit.
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 1, max_seq_len: int,
                 compile: bool = False, compile_prefill: bool = False, mode: str | None = None,
                 compile_backend: str = "inductor", prefill_chunk_tokens: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be None or at least 1, got "
                             f"{prefill_chunk_tokens}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2 (a prompt token and a new "
                             f"one), got {max_seq_len}")
        self.model = model
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        # positions per prefill forward: at least one, however many rows the batch has
        self._prefill_positions = (None if prefill_chunk_tokens is None
                                   else max(1, prefill_chunk_tokens // batch_size))
        self.device = model.device
        self.cache = new_static_cache(model, batch_size, max_seq_len)
        self._forward_arguments = CachedForwardArguments(model)
        if mode is None and self.device.type == "cuda" and compile_backend == "inductor":
            mode = "reduce-overhead"
        self._decode = (torch.compile(self.last_logits, fullgraph=True, mode=mode,
                                      backend=compile_backend)
                        if compile else self.last_logits)
        self._prefill = (torch.compile(self.last_logits, fullgraph=True,
                                       backend=compile_backend)
                         if compile_prefill else self.last_logits)

    def last_logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The uncompiled step that prefill and decode compile: (B, L) tokens at `positions`
        (L,) written into the cache → the last position's (B, V) logits."""
        out = self.model(input_ids=input_ids,
                         **self._forward_arguments(self.cache, positions))
        return out.logits[:, -1, :]

    def _check_request(self, input_ids: torch.Tensor, max_new_tokens: int) -> int:
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids must have shape ({self.batch_size}, prompt length) "
                             f"for this generator's batch_size, got {tuple(input_ids.shape)}")
        prompt_len = input_ids.shape[1]
        if prompt_len == 0:
            raise ValueError("input_ids is empty: the prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt_len + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} "
                             f"exceeds max_seq_len {self.max_seq_len}")
        return prompt_len

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Empty the cache and run the prompt (in chunks of positions when the generator has
        a prefill_chunk_tokens); returns the last position's (B, V) logits."""
        self.cache.reset()
        input_ids = input_ids.to(self.device)
        length = input_ids.shape[1]
        chunk = self._prefill_positions or length
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            logits = self._prefill(input_ids[:, start:end],
                                   torch.arange(start, end, device=self.device))
        return logits

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One step: (B,) tokens at absolute `position` (a (1,) tensor) → (B, V) logits.

        Under CUDA graphs the result is overwritten by the next step: consume it first.
        """
        return self._decode(tokens[:, None], position)

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
               top_p: float = 1.0, eos_token_ids: Iterable[int] = (),
               seed: int | None = None) -> Iterator[torch.Tensor]:
        """Yield each step's (B,) tokens. Stops after `max_new_tokens`, or once every row has
        produced an end-of-sequence token (finished rows then repeat that token)."""
        check_sampling(temperature, top_p)
        prompt_len = self._check_request(input_ids, max_new_tokens)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=self.device)
        finished = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        logits = self.prefill(input_ids)
        position = torch.tensor([prompt_len], device=self.device)
        for step in range(max_new_tokens):
            tokens = sample_next_token(logits, temperature, top_p, generator)
            if eos.numel():
                tokens = torch.where(finished, eos[0], tokens)
                finished |= torch.isin(tokens, eos)
            yield tokens
            if step + 1 == max_new_tokens or (eos.numel() and bool(finished.all())):
                return
            logits = self.decode(tokens, position)
            position += 1

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """The prompt followed by the generated tokens, (B, L + new); see `stream`."""
        new = list(self.stream(input_ids, max_new_tokens, **sampling))
        return torch.cat([input_ids.to(self.device), torch.stack(new, dim=1)], dim=1)
