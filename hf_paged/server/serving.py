"""A uvicorn server that drains on shutdown.

Plain uvicorn, told to stop, waits ``timeout_graceful_shutdown`` seconds for open connections and then
cancels their tasks: a stream still open is cut off mid-body (the client reads an incomplete chunked
response, with no final frame) and uvicorn logs the cancellation as an error. Generations are long, so
here the shutdown (SIGTERM, Ctrl-C) goes in three steps:

1. at once, uvicorn stops accepting connections (a load balancer's probe is refused) and the app admits no
   request (503, ``/health`` too, on a kept-alive connection);
2. running requests have ``drain`` seconds to finish as usual;
3. those still running are then cancelled by the app: a stream ends with an error frame that says the
   server is shutting down (status 503 in the frame), a request without streaming gets a 503; both close
   their connections cleanly, and uvicorn's own cancellation is left for clients that stop reading.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn

# After the drain, the time the cancelled requests' last frames have to go out before uvicorn cuts them.
FLUSH_S = 3.0


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` for an app of :func:`~hf_paged.server.create_app`, draining it on shutdown."""

    def __init__(self, app: Any, drain: float = 5.0, **config: Any) -> None:
        if not drain >= 0:  # NaN too
            raise ValueError(f"the shutdown drain must be >= 0 seconds, got {drain}")
        self.drain = drain
        self.app_state = app.state.hf_paged
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=drain + FLUSH_S, **config))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app_state.closing = True
        timer = asyncio.get_running_loop().call_later(self.drain, self.app_state.cancel_requests)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
