"""An OpenAI-style HTTP API over a `CompletionEngine`: POST /v1/completions (plain JSON or
server-sent events), GET /v1/models, GET /health. Needs fastapi (the `serve` extra)."""

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Completion, CompletionEngine, RequestError
from .schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    Usage,
)


class ModelNotFoundError(RequestError):
    status = 404
    code = "model_not_found"


def _error(status: int, message: str, param: str | None = None,
           code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


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
    return f"data: {json.dumps(body.model_dump(exclude={'usage'} if usage is None else None))}\n\n"


async def _events(stream: AsyncIterator[str | Completion], model: str) -> AsyncIterator[str]:
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    async for item in stream:
        if isinstance(item, Completion):
            usage = Usage(prompt_tokens=item.prompt_tokens,
                          completion_tokens=item.completion_tokens,
                          total_tokens=item.prompt_tokens + item.completion_tokens)
            yield _chunk(completion_id, created, model, "", item.finish_reason, usage)
        else:
            yield _chunk(completion_id, created, model, item)
    yield "data: [DONE]\n\n"


def create_app(engine: CompletionEngine, model_name: str) -> FastAPI:
    """The app serving `engine` as model `model_name`; shutting the app down shuts the
    engine down (queued requests dropped, the running one stopped at its next token)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="curkernels", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param)

    @app.exception_handler(RequestError)
    async def _refused(_request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "owned_by": "curkernels",
                                            "max_model_len": engine.max_seq_len}]}

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(request: CompletionRequest):
        if request.model != model_name:
            raise ModelNotFoundError(f"model {request.model!r} is not served here; this "
                                     f"server has {model_name!r}", param="model")
        job = engine.prepare(request.prompt, request.max_tokens,
                             temperature=request.temperature, top_p=request.top_p,
                             stop=request.stop, seed=request.seed)
        if request.stream:
            return StreamingResponse(_events(engine.stream(job), model_name),
                                     media_type="text/event-stream")
        result = await engine.complete(job)
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_name,
            choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
            usage=Usage(prompt_tokens=result.prompt_tokens,
                        completion_tokens=result.completion_tokens,
                        total_tokens=result.prompt_tokens + result.completion_tokens))

    return app
