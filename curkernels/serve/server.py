"""An OpenAI-style HTTP API over a `CompletionEngine`: POST /v1/completions (plain JSON or
server-sent events), GET /v1/models, GET /health. Needs fastapi (the `serve` extra).

Every error is answered in OpenAI's JSON error format. A request whose client disconnects is
abandoned: dropped from the queue, or stopped at its next token. A streamed response starts
(200) once the request's first text is ready, so refusals until then get their own status;
an error after that ends the stream with an error event.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive

from .body_limit import BodySizeLimit
from .engine import Completion, CompletionEngine, RequestError
from .http_errors import error_body, error_event, error_response, unexpected_error_message
from .schemas import CompletionChoice, CompletionRequest, CompletionResponse, Usage

# Enough for a prompt of some 250k ASCII characters, well past this server's default context.
DEFAULT_MAX_BODY_BYTES = 1 << 20

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ModelNotFoundError(RequestError):
    status = 404
    code = "model_not_found"


class ClientDisconnectedError(RequestError):
    status = 499  # nginx's "client closed request": nobody reads it, the access log shows it
    code = "client_closed_request"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence from pydantic's error list, and the first offending field."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "malformed")
        return f"the request body is not valid JSON ({reason})", None
    parts, first = [], None
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        name = ".".join(loc) or "body"
        first = first or name
        parts.append(f"{name}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts), first


def _chunk(completion_id: str, created: int, model: str, text: str,
           finish_reason: str | None = None, usage: Usage | None = None) -> str:
    body = CompletionResponse(id=completion_id, created=created, model=model, usage=usage,
                              choices=[CompletionChoice(text=text, finish_reason=finish_reason)])
    # as OpenAI streams it: null finish_reason and logprobs on every chunk, usage on the last
    return f"data: {body.model_dump_json(exclude={'usage'} if usage is None else None)}\n\n"


def _usage(completion: Completion) -> Usage:
    return Usage(prompt_tokens=completion.prompt_tokens,
                 completion_tokens=completion.completion_tokens,
                 total_tokens=completion.prompt_tokens + completion.completion_tokens)


async def _events(first: str | Completion, rest: AsyncGenerator[str | Completion, None],
                  model: str) -> AsyncIterator[str]:
    """A completion as server-sent events: `first`, then the rest of its text deltas, a last
    chunk with the finish reason and usage, and `[DONE]`; or, if it fails on the way, an error
    event in place of the rest."""
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    async with contextlib.aclosing(rest):
        item = first
        try:
            while not isinstance(item, Completion):
                yield _chunk(completion_id, created, model, item)
                item = await anext(rest)
        except Exception as error:  # the 200 is out: the error can only go in the stream
            if not isinstance(error, RequestError):
                logger.error("a streamed completion failed", exc_info=error)
            yield error_event(error)
            return
    yield _chunk(completion_id, created, model, "", item.finish_reason, _usage(item))
    yield "data: [DONE]\n\n"


async def _disconnection(receive: Receive) -> None:
    """Returns once the client has disconnected (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, answer: Awaitable[T]) -> T:
    """`answer`'s result; if the client disconnects first, `answer` is cancelled (which
    abandons its engine job) and ClientDisconnectedError raised."""
    answering = asyncio.ensure_future(answer)
    watching = asyncio.ensure_future(_disconnection(request.receive))
    try:
        await asyncio.wait({answering, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not answering.done():
            answering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering
    if answering.cancelled():
        raise ClientDisconnectedError("the client disconnected before the completion was ready")
    return answering.result()


def create_app(engine: CompletionEngine, model_name: str, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app serving `engine` as model `model_name`; request bodies over `max_body_bytes`
    get 413. Shutting the app down shuts the engine down (queued requests fail with 503, the
    running one stops at its next token)."""
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) \
            or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="curkernels", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(RequestError)
    async def _refused(_request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors: no such route, method not allowed, an unreadable body."""
        message = f"{exc.detail} ({request.method} {request.url.path})"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception once this is sent: the server logs its traceback
        return error_response(500, unexpected_error_message(exc))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "owned_by": "curkernels",
                                            "max_model_len": engine.max_seq_len}]}

    async def answer(body: CompletionRequest):
        job = await engine.prepare(body.prompt, body.max_tokens, temperature=body.temperature,
                                   top_p=body.top_p, stop=body.stop, seed=body.seed)
        if body.stream:
            deltas = engine.stream(job)
            first = await anext(deltas)  # its turn has come and generation works: send the 200
            return StreamingResponse(_events(first, deltas, model_name),
                                     media_type="text/event-stream")
        result = await engine.complete(job)
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_name,
            choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
            usage=_usage(result))

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request):
        if body.model != model_name:
            raise ModelNotFoundError(f"model {body.model!r} is not served here; this "
                                     f"server has {model_name!r}", param="model")
        return await _unless_disconnected(request, answer(body))

    return app
