"""Completions over one model, one generation at a time.

The generator owns a single static KV cache, so generations cannot overlap: requests wait in
arrival order on a one-thread executor (the thread also keeps CUDA-graph state, which is
per-thread, in one place). Prompts are tokenized on a thread of their own, so a long prompt
does not stall the event loop (other requests' answers, streamed tokens). A request whose client goes away
leaves the queue, or stops at its next token; at shutdown, queued requests fail at once with
`ServerShuttingDownError`. The HTTP layer only validates and formats.
"""

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
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


class ServerShuttingDownError(RequestError):
    status = 503
    code = "server_shutting_down"


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


@dataclass(eq=False)
class _Ticket:
    """An admitted request: its job, where its text goes, and its outcome. The future goes
    pending → running → done on the generation thread, or pending → cancelled (abandoned by
    its client) or pending → failed (refused at shutdown) without ever running."""

    job: CompletionJob
    on_text: Callable[[str], None] | None
    future: Future = field(default_factory=Future)
    abandoned: threading.Event = field(default_factory=threading.Event)


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
        self._generation = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")
        self._tokenization = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        # Admission, refusal and every change of a queued ticket's state happen under this lock,
        # so a ticket is never both started and refused. Reentrant: a future's done callback
        # (which takes it) runs in the thread that resolves the future.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._tickets: set[_Ticket] = set()  # admitted, not yet finished
        self._refusing = False
        self._stopping = threading.Event()

    @property
    def max_seq_len(self) -> int:
        return self.generator.max_seq_len

    @property
    def _admitted(self) -> int:
        return len(self._tickets)

    async def prepare(self, prompt: str, max_tokens: int, *, temperature: float = 1.0,
                      top_p: float = 1.0, stop: list[str] = (), seed: int | None = None
                      ) -> CompletionJob:
        """Tokenize (on the tokenizer thread) and check that prompt + max_tokens fit the
        cache. Call from the event loop."""
        with self._lock:
            self._refuse_if_closing()
            # ids only: the other outputs are Python lists as long as the prompt, built while
            # holding the GIL (a 1 MB prompt stalls the event loop half as long without them)
            tokenized = self._tokenization.submit(self.tokenizer, prompt,
                                                  return_attention_mask=False,
                                                  return_token_type_ids=False)
        prompt_ids = (await asyncio.wrap_future(tokenized))["input_ids"]
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
        self._generation.submit(self.generator.generate, input_ids, tokens).result()

    def run(self, job: CompletionJob, on_text: Callable[[str], None] | None = None,
            cancelled: threading.Event | None = None) -> Completion:
        """Generate for `job` on the calling thread; `on_text` receives each text delta.
        Setting `cancelled` stops it at its next token; shutting the engine down makes it
        raise ServerShuttingDownError there."""
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
            if self._stopping.is_set():
                raise ServerShuttingDownError("the server shut down before this completion "
                                              f"finished ({count} tokens generated)")
            if cancelled is not None and cancelled.is_set():
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

    def _refuse_if_closing(self) -> None:
        if self._refusing:
            raise ServerShuttingDownError("the server is shutting down: retry on another "
                                          "instance or after it restarts")

    def _admit(self, job: CompletionJob, on_text) -> _Ticket:
        with self._lock:
            self._refuse_if_closing()
            if len(self._tickets) >= self.max_queued:
                raise ServerBusyError(f"{len(self._tickets)} requests are already queued or "
                                      f"running (the limit is {self.max_queued}): retry later")
            ticket = _Ticket(job, on_text)
            self._tickets.add(ticket)
            ticket.future.add_done_callback(lambda _future: self._release(ticket))
            self._generation.submit(self._serve, ticket)
        return ticket

    def _release(self, ticket: _Ticket) -> None:
        with self._lock:
            self._tickets.discard(ticket)
            self._idle.notify_all()

    def _serve(self, ticket: _Ticket) -> None:
        """On the generation thread: run the ticket's job, unless it was abandoned or refused
        while it waited."""
        with self._lock:
            if ticket.future.done() or not ticket.future.set_running_or_notify_cancel():
                return
        try:
            completion = self.run(ticket.job, ticket.on_text, ticket.abandoned)
        except Exception as error:  # the request's outcome: the HTTP layer reports it
            ticket.future.set_exception(error)
        else:
            ticket.future.set_result(completion)

    def _abandon(self, ticket: _Ticket) -> None:
        """The client went away: drop its job from the queue, or stop it at its next token."""
        with self._lock:
            if not ticket.future.done():
                ticket.abandoned.set()
                ticket.future.cancel()

    async def complete(self, job: CompletionJob) -> Completion:
        """The whole completion, once it is this request's turn and it has finished.
        Cancelling the awaiting task abandons the job."""
        ticket = self._admit(job, None)
        try:
            return await asyncio.wrap_future(ticket.future)
        finally:
            self._abandon(ticket)

    def stream(self, job: CompletionJob) -> AsyncIterator[str | Completion]:
        """Queue `job` now (so a refusal comes before any response is sent) and return an
        iterator of its text deltas as they are generated, then the final `Completion`.
        Closing or cancelling the iterator abandons the job. Call from the event loop."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()

        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, item)
            except RuntimeError:  # the event loop closed: nobody is listening any more
                pass

        ticket = self._admit(job, post)
        ticket.future.add_done_callback(lambda _future: post(_FINISHED))
        return self._drain(deltas, ticket)

    async def _drain(self, deltas: asyncio.Queue,
                     ticket: _Ticket) -> AsyncIterator[str | Completion]:
        try:
            while (item := await deltas.get()) is not _FINISHED:
                if item:
                    yield item
            yield ticket.future.result()
        finally:
            self._abandon(ticket)

    def close(self) -> None:
        """Refuse new requests and fail the queued ones with ServerShuttingDownError now;
        the running one goes on."""
        with self._lock:
            self._refusing = True
            for ticket in list(self._tickets):
                if ticket.future.running():
                    continue
                try:
                    ticket.future.set_exception(ServerShuttingDownError(
                        "the server is shutting down: this request was still queued"))
                except InvalidStateError:  # its client abandoned it at this very moment
                    pass

    def drain(self, timeout: float | None) -> None:
        """Shut down gracefully: `close`, give the running request up to `timeout` seconds
        (None: as long as it takes) to finish, then `shutdown`."""
        self.close()
        with self._idle:
            self._idle.wait_for(lambda: not self._tickets, timeout)
        self.shutdown()

    def shutdown(self) -> None:
        """`close`, stop the running request at its next token (it fails with
        ServerShuttingDownError), and wait for the engine's threads to finish."""
        self.close()
        self._stopping.set()
        self._generation.shutdown(wait=True)
        self._tokenization.shutdown(wait=True)
