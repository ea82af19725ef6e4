"""Every error the HTTP server reports, in OpenAI's JSON error format:
`{"error": {"message", "type", "param", "code"}}`, as a response or as a stream's last event."""

import json

from fastapi.responses import JSONResponse

from .engine import RequestError
from .schemas import ErrorDetail, ErrorResponse


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param,
                                           code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def unexpected_error_message(error: BaseException) -> str:
    return (f"the server failed on this request ({type(error).__name__}: {error}); the "
            "server's log has the traceback")


def error_event(error: Exception) -> str:
    """A server-sent event ending a stream whose 200 has already gone out, shaped as OpenAI
    streams an error: `data: {"error": {...}}`."""
    if isinstance(error, RequestError):
        body = error_body(error.status, error.message, error.param, error.code)
    else:
        body = error_body(500, unexpected_error_message(error))
    return f"data: {json.dumps(body)}\n\n"
