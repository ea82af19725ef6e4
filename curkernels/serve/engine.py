"""Completions over one model, one generation at a time.

The generator owns a single static KV cache, so generations cannot overlap: requests wait in
arrival order on a one-thread executor (the thread also keeps CUDA-graph state, which is
per-thread, in one place). The HTTP layer only validates and formats.
"""

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .generation import StaticCacheGenerator, end_of_sequence_ids
from .text_stream import IncrementalDetokenizer, StopMatcher

_FINISHED = object()  # posted after a streamed job's last delta


class RequestError(Exception):
    """A request the engine refuses, with the HTTP status and OpenAI error code to report."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ContextLengthError(RequestError):
    code = "context_length_exceeded"


class ServerBusyError(RequestError):
    status = 429
    code = "server_busy"


@dataclass(frozen=True)
class CompletionJob:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"


class CompletionEngine:
    """Tokenizes, checks lengths, and runs generations one after another.

    Args:
        generator: a batch-1 `StaticCacheGenerator`; its max_seq_len bounds prompt + output.
        tokenizer: the model's tokenizer.
        max_queued: requests admitted at once (running + waiting); more get ServerBusyError.
    """

    def __init__(self, generator: StaticCacheGenerator, tokenizer, *, max_queued: int = 32):
        if generator.batch_size != 1:
            raise ValueError(f"the engine runs one request at a time: the generator needs "
                             f"batch_size=1, got {generator.batch_size}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.generator = generator
        self.tokenizer = tokenizer
        self.max_queued = max_queued
        self.eos_token_ids = end_of_sequence_ids(generator.model, tokenizer)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")
        self._admitted = 0
        self._admission = threading.Lock()
        self._closing = threading.Event()

    @property
    def max_seq_len(self) -> int:
        return self.generator.max_seq_len

    def prepare(self, prompt: str, max_tokens: int, *, temperature: float = 1.0,
                top_p: float = 1.0, stop: list[str] = (), seed: int | None = None
                ) -> CompletionJob:
        """Tokenize and check that prompt + max_tokens fit the cache."""
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            raise RequestError("the prompt encodes to no tokens", param="prompt")
        if len(prompt_ids) + max_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"this model's context is {self.max_seq_len} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens asks for {max_tokens} more "
                f"({len(prompt_ids) + max_tokens} in all)", param="max_tokens")
        return CompletionJob(prompt_ids, max_tokens, temperature, top_p, list(stop), seed)

    def warm_up(self, prompt: str = "warm up", tokens: int = 3) -> None:
        """Generate a few tokens on the generation thread, where compiled graphs and CUDA
        graphs are recorded (their state is per thread), before the first request."""
        input_ids = torch.tensor([self.tokenizer(prompt)["input_ids"]], dtype=torch.long)
        self._executor.submit(self.generator.generate, input_ids, tokens).result()

    def run(self, job: CompletionJob, on_text: Callable[[str], None] | None = None,
            cancelled: threading.Event | None = None) -> Completion:
        """Generate for `job` on the calling thread; `on_text` receives each text delta."""
        emit = on_text or (lambda _text: None)
        detokenizer, stops = IncrementalDetokenizer(self.tokenizer), StopMatcher(job.stop)
        pieces, count, finish_reason = [], 0, "length"
        input_ids = torch.tensor([job.prompt_ids], dtype=torch.long)
        for tokens in self.generator.stream(input_ids, job.max_tokens,
                                            temperature=job.temperature, top_p=job.top_p,
                                            eos_token_ids=self.eos_token_ids, seed=job.seed):
            token = int(tokens[0])
            count += 1
            if token in self.eos_token_ids:
                finish_reason = "stop"
                break
            text = stops.feed(detokenizer.push(token))
            pieces.append(text)
            emit(text)
            if stops.stopped:
                finish_reason = "stop"
                break
            if self._closing.is_set() or (cancelled is not None and cancelled.is_set()):
                break
        if not stops.stopped:
            tail = stops.feed(detokenizer.finish())
            if stops.stopped:
                finish_reason = "stop"
            else:
                tail += stops.flush()
            pieces.append(tail)
            emit(tail)
        return Completion("".join(pieces), len(job.prompt_ids), count, finish_reason)

    def _submit(self, job: CompletionJob, on_text, cancelled: threading.Event) -> Future:
        with self._admission:
            if self._closing.is_set():
                raise ServerBusyError("the server is shutting down")
            if self._admitted >= self.max_queued:
                raise ServerBusyError(f"{self._admitted} requests are already queued or "
                                      f"running (the limit is {self.max_queued}): retry later")
            self._admitted += 1
        future = self._executor.submit(self.run, job, on_text, cancelled)
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: Future) -> None:
        with self._admission:
            self._admitted -= 1

    async def complete(self, job: CompletionJob) -> Completion:
        """The whole completion, once it is this request's turn and it has finished."""
        cancelled = threading.Event()
        future = self._submit(job, None, cancelled)
        try:
            return await asyncio.wrap_future(future)
        finally:
            if not future.done():  # the client went away: free the queue slot
                cancelled.set()
                future.cancel()

    def stream(self, job: CompletionJob) -> AsyncIterator[str | Completion]:
        """Queue `job` now (so a refusal comes before any response is sent) and return an
        iterator of its text deltas as they are generated, then the final `Completion`.
        Call from the event loop's thread."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()

        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, item)
            except RuntimeError:  # the event loop closed: nobody is listening any more
                pass

        cancelled = threading.Event()
        future = self._submit(job, post, cancelled)
        future.add_done_callback(lambda _f: post(_FINISHED))
        return self._drain(deltas, future, cancelled)

    @staticmethod
    async def _drain(deltas: asyncio.Queue, future: Future,
                     cancelled: threading.Event) -> AsyncIterator[str | Completion]:
        try:
            while (item := await deltas.get()) is not _FINISHED:
                if item:
                    yield item
            yield future.result()
        finally:
            if not future.done():  # the client went away: stop generating for it
                cancelled.set()
                future.cancel()

    def shutdown(self) -> None:
        """Refuse new requests, drop queued ones, stop the running one at its next token."""
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
