"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: streamed responses and disconnects pass through
untouched): the API key, the request body limit and ``OPTIONS``.
"""
from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import payload_too_large, unauthorized

# TGI's `base_routes` (behind its API key, as every POST is here); a request refused before one of them ran
# counts in the metrics. Info, health, metrics and models are GETs and stay open.
GENERATION_ROUTES = frozenset({"/", "/generate", "/generate_stream", "/tokenize", "/chat_tokenize",
                               "/v1/chat/completions", "/v1/completions"})


def route_path(scope: Scope) -> str:
    """The path the app's router matches: ``path`` less the ``root_path`` the app is served under (Ray Serve's
    ``route_prefix``, ``uvicorn --root-path``, a mount), which ASGI servers may leave in ``path``."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


class BearerAuth:
    """Every POST needs ``Authorization: Bearer <api_key>``: the generation routes (TGI's rule) and any other,
    so that no route is left open by a path it was not listed under (deny by default). The UI under
    ``open_prefix`` checks the key itself (its password). The scheme is case-insensitive, the key is compared
    exactly and in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, open_prefix: str | None = None) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.open_prefix = open_prefix

    def _open(self, path: str) -> bool:
        p = self.open_prefix
        return p is not None and (path == p or path.startswith(p + "/"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not self._open(route_path(scope)):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, key = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.expected):
                await unauthorized().response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


DRAIN_FACTOR = 16


class BodyLimit:
    """Answers 413 (TGI's error body) to a request body over ``max_bytes``, before any of it is parsed.

    The body is read here, counted as it arrives (a missing or lying Content-Length changes nothing),
    and replayed to the app. ``on_reject(path)`` counts the failure in the metrics.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, body_complete=False)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body was complete: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, body_complete=not more)
                return
            chunks.append(chunk)
            if not more:
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then disconnect detection as usual

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, *, body_complete: bool) -> None:
        """413. The rest of the body is read and dropped first (up to ``DRAIN_FACTOR`` times the limit):
        a client still sending when the server closes gets a connection reset, not the answer."""
        self.on_reject(route_path(scope))
        response = payload_too_large(self.max_bytes).response()
        drained = body_complete
        budget = DRAIN_FACTOR * self.max_bytes
        while not drained and budget > 0:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            budget -= len(message.get("body", b""))
            drained = not message.get("more_body", False)
        if not drained:
            response.headers["connection"] = "close"  # a body this large is not worth reading
        await response(scope, receive, send)


class Options:
    """``OPTIONS`` on any API path answers 204 with ``Allow`` (the methods its routes take, read from
    the app's OpenAPI schema), where FastAPI would answer 405. CORS preflights are not answered here:
    give the app CORSMiddleware."""

    def __init__(self, app: ASGIApp, router_app) -> None:
        self.app = app
        self.router_app = router_app  # the FastAPI app whose schema lists the paths
        self._allowed: dict[str, str] | None = None

    def allowed(self, path: str) -> str | None:
        if self._allowed is None:  # the routes are all in place by the first request
            paths = self.router_app.openapi().get("paths", {})
            methods = {p: {m.upper() for m in ops} | {"OPTIONS"} for p, ops in paths.items()}
            self._allowed = {p: ", ".join(sorted(ms | ({"HEAD"} if "GET" in ms else set())))
                             for p, ms in methods.items()}
        return self._allowed.get(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            allow = self.allowed(route_path(scope))
            if allow:
                await send({"type": "http.response.start", "status": 204,
                            "headers": [(b"allow", allow.encode()), (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)
