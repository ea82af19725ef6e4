"""An ASGI middleware that reads each request body whole, up to a byte limit, before the app
parses it, and answers a larger body with 413 in OpenAI's error format without reading on.

Starlette's own limit (`max_body_size`, starlette >= 1.6) answers in plain text when the
Content-Length is over the limit, and the server answers every error in OpenAI's format.
"""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http_errors import error_response


class BodySizeLimit:
    """Refuse request bodies over `max_bytes`: at once when the Content-Length says so, and
    as soon as the bytes read pass the limit otherwise (chunked or unannounced bodies)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(f"the request body is {declared} bytes", scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(f"the request body passed {self.max_bytes} bytes",
                                   scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, what: str, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, f"{what}; this server accepts at most {self.max_bytes} bytes",
            code="request_too_large")
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # malformed: count the bytes instead
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the whole body at once, then passes on what the server
    sends next (the client's disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
