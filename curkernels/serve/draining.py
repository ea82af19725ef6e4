"""uvicorn's server, made to drain the completion engine first when told to stop (SIGTERM,
Ctrl-C): queued requests get 503 at once and the running one gets the graceful period to
finish (then 503 too), before uvicorn closes the connections."""

import asyncio

import uvicorn

from .engine import CompletionEngine


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` for an app over `engine`; the config's timeout_graceful_shutdown is
    the time the running request gets (None: as long as it takes)."""

    def __init__(self, config: uvicorn.Config, engine: CompletionEngine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets=None) -> None:
        await asyncio.to_thread(self.engine.drain, self.config.timeout_graceful_shutdown)
        await super().shutdown(sockets=sockets)
