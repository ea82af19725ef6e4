"""Static-KV-cache generation, eager or compiled (torch.compile + CUDA graphs on GPU).

Eager transformers decoding is host-bound: a dynamic cache changes every tensor shape each
step, so nothing can be captured once and replayed. Here the KV cache is preallocated at a
fixed length, every decode step has the same shapes, and the whole model forward compiles
into one graph (`fullgraph=True`: a graph break, e.g. from a curkernels op, is an error rather
than a silent slowdown) that CUDA graphs replay with one launch per token.

With a draft model (speculative decoding, batch size 1) each round drafts k tokens with the
draft over its own static cache, verifies them in one target forward over k + 1 positions,
and keeps the accepted prefix plus the target's next token. Rolling a cache back only resets
its length (`truncate_cache`): the rejected positions are overwritten by the next round.
"""

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..speculative.verification import accept_greedy, accept_sampled
from .hf_compat import CachedForwardArguments, new_static_cache, truncate_cache
from .sampling import check_sampling, sample_next_token, token_probabilities


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
        draft: a draft model over the same vocabulary (e.g. `curkernels.make_draft`): decode
            speculatively; needs batch_size 1. Greedy output is the target's own greedy
            output, sampled output has the target's distribution.
        num_draft_tokens: tokens drafted per verification (k).

    Generators over models of one structure share compiled graphs; each other structure or
    shape adds a graph to the same step function, up to torch._dynamo.config.recompile_limit.
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 1, max_seq_len: int,
                 compile: bool = False, compile_prefill: bool = False, mode: str | None = None,
                 compile_backend: str = "inductor", prefill_chunk_tokens: int | None = None,
                 draft: nn.Module | None = None, num_draft_tokens: int = 4):
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
        self.draft = draft
        if draft is not None:
            self._init_draft(draft, num_draft_tokens, compile, mode, compile_backend)

    def _init_draft(self, draft: nn.Module, num_draft_tokens: int, compile: bool,
                    mode: str | None, compile_backend: str) -> None:
        if self.batch_size != 1:
            raise ValueError(f"speculative decoding (draft=) needs batch_size 1, got "
                             f"{self.batch_size}: rows would accept different numbers of tokens")
        if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be a positive integer, got "
                             f"{num_draft_tokens!r}")
        vocab, draft_vocab = self.model.config.vocab_size, draft.config.vocab_size
        if vocab != draft_vocab:
            raise ValueError(f"draft has a vocabulary of {draft_vocab} tokens, the model "
                             f"{vocab}: a draft must share the target's tokenizer")
        if draft.device != self.device:
            raise ValueError(f"draft is on {draft.device}, the model on {self.device}")
        self.num_draft_tokens = num_draft_tokens
        self.draft_cache = new_static_cache(draft, 1, self.max_seq_len)
        self._draft_arguments = CachedForwardArguments(draft)
        self.accepted_per_step: list[int] = []  # drafted tokens that stood, per verification
        compiled = (lambda f: torch.compile(f, fullgraph=True, mode=mode,
                                            backend=compile_backend)) if compile else (lambda f: f)
        self._draft_step = compiled(self.draft_last_logits)
        self._verify = compiled(self.verify_logits)

    def last_logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The uncompiled step that prefill and decode compile: (B, L) tokens at `positions`
        (L,) written into the cache → the last position's (B, V) logits."""
        out = self.model(input_ids=input_ids,
                         **self._forward_arguments(self.cache, positions))
        return out.logits[:, -1, :]

    def draft_last_logits(self, input_ids: torch.Tensor, positions: torch.Tensor
                          ) -> torch.Tensor:
        """The draft over its own cache: (1, L) tokens at `positions` → the last (1, V) logits."""
        out = self.draft(input_ids=input_ids,
                         **self._draft_arguments(self.draft_cache, positions))
        return out.logits[:, -1, :]

    def verify_logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The target over (1, L) tokens at `positions` → the (L, V) logits of every position."""
        kwargs = self._forward_arguments(self.cache, positions)
        if self._forward_arguments.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 0  # all positions
        return self.model(input_ids=input_ids, **kwargs).logits[0]

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
        return self._run_prompt(self._prefill, input_ids)

    def _run_prompt(self, step, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        length = input_ids.shape[1]
        chunk = self._prefill_positions or length
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            logits = step(input_ids[:, start:end], torch.arange(start, end, device=self.device))
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
        if self.draft is not None:
            yield from self._speculative_stream(input_ids, max_new_tokens, temperature, top_p,
                                                eos, generator)
            return
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

    @torch.no_grad()
    def _speculative_stream(self, input_ids: torch.Tensor, max_new_tokens: int,
                            temperature: float, top_p: float, eos: torch.Tensor,
                            generator: torch.Generator | None) -> Iterator[torch.Tensor]:
        """`stream` with a draft: rounds of draft k, verify k + 1 positions, keep the accepted.

        `pending` holds the tokens the draft's cache lacks, ending with `token`, the newest
        emitted token (at `position`, not yet in the target's cache)."""
        prompt_len = input_ids.shape[1]
        self.accepted_per_step = []
        token = sample_next_token(self.prefill(input_ids), temperature, top_p, generator)[0]
        self.draft_cache.reset()
        self._run_prompt(self._draft_step, input_ids)
        position, pending, emitted = prompt_len, [token], 1
        yield token[None]
        while emitted < max_new_tokens and not bool(torch.isin(token, eos)):
            k = min(self.num_draft_tokens, max_new_tokens - emitted - 1,
                    self.max_seq_len - 1 - position)
            drafted, draft_probs = self._draft_round(pending, position, k, temperature, top_p,
                                                     generator)
            logits = self._verify(torch.stack([token, *drafted])[None],
                                  torch.arange(position, position + k + 1, device=self.device))
            proposed = torch.stack([token, *drafted])[1:]  # (k,), empty when k is 0
            if temperature == 0:
                accepted, token = accept_greedy(proposed, logits)
            else:
                target_probs = token_probabilities(logits, temperature, top_p)
                accepted, token = accept_sampled(proposed, torch.stack([*draft_probs,
                                                                        target_probs[0]])[:k],
                                                 target_probs, generator)
            self.accepted_per_step.append(accepted)
            # the draft's cache holds the drafted tokens it was fed (all but the last) up to the
            # first one rejected; what it lacks it is fed at the start of the next round
            if k == 0:
                pending = [*pending, token]
            else:
                pending = [drafted[-1], token] if accepted == k else [token]
                truncate_cache(self.draft_cache, position + min(accepted + 1, k))
            position += accepted + 1
            truncate_cache(self.cache, position)
            for new in [*drafted[:accepted], token]:
                yield new[None]
                emitted += 1
                if bool(torch.isin(new, eos)):
                    return

    def _draft_round(self, pending: list[torch.Tensor], position: int, k: int,
                     temperature: float, top_p: float, generator: torch.Generator | None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """k draft tokens after `pending` (which ends at `position`), and with temperature > 0
        the distributions they were drawn from."""
        drafted, probs = [], []
        feed = torch.stack(pending)[None]
        positions = torch.arange(position - len(pending) + 1, position + 1, device=self.device)
        for i in range(k):
            logits = self._draft_step(feed, positions)[0]
            if temperature == 0:
                drafted.append(logits.argmax(-1))
            else:
                probs.append(token_probabilities(logits, temperature, top_p))
                drafted.append(torch.multinomial(probs[-1], 1, generator=generator)[0])
            feed = drafted[-1][None, None]
            positions = torch.tensor([position + 1 + i], device=self.device)
        return drafted, probs

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """The prompt followed by the generated tokens, (B, L + new); see `stream`."""
        new = list(self.stream(input_ids, max_new_tokens, **sampling))
        return torch.cat([input_ids.to(self.device), torch.stack(new, dim=1)], dim=1)
