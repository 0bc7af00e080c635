"""Errors in TGI's shape: ``{"error": "...", "error_type": "..."}`` with TGI's status codes.

TGI (``router/src/server.rs``, ``impl From<InferError>``) answers 422 for validation, 429 when
overloaded, 424 for generation failures. Every way a request can be malformed (bad JSON, invalid
UTF-8, absurd nesting, wrong types, out-of-range values, unknown routes) must land here, never on
FastAPI's default ``{"detail": ...}`` body and never on a 5xx. A bug of ours is a 500 in the same
shape (``error_type: "internal"``), never Starlette's plain-text page.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .encoding import JSONResponse
from .schemas import ErrorResponse

logger = logging.getLogger(__name__)


# What the OpenAPI schema promises for the generation routes (and the fuzz tests hold the server to):
# TGI's error body for every status such a route can answer before streaming starts.
ERROR_RESPONSES: dict[int | str, dict] = {code: {"model": ErrorResponse, "description": why} for code, why in [
    (401, "Missing or wrong API key"), (413, "Request body too large"), (422, "Input validation error"),
    (424, "Generation failed"), (429, "Model is overloaded"), (500, "Internal error"), (503, "Shutting down")]}


class APIError(Exception):
    """An error answer; ``message`` is the full ``error`` string the client sees."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    def body(self) -> dict:
        """The JSON body; also the SSE event of an error after a TGI stream began."""
        return {"error": self.message, "error_type": self.error_type}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready (answered 499, which nobody reads)."""


def openai_error_frame(exc: APIError) -> dict:
    """The SSE event of an error after an OpenAI stream began (TGI's shape for it)."""
    return {"error": {"message": exc.message, "http_status_code": exc.status}}


def validation_error(message: str) -> APIError:
    return APIError(422, f"Input validation error: {message}", "validation")


def overloaded() -> APIError:
    return APIError(429, "Model is overloaded", "overloaded")


def generation_error(message: str) -> APIError:
    return APIError(424, f"Request failed during generation: {message}", "generation")


def internal_error(exc: BaseException) -> APIError:
    return APIError(500, f"Internal server error ({type(exc).__name__}); the server log has the details", "internal")


def payload_too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than the server's limit of {limit} bytes", "payload_too_large")


def failure_label(exc: APIError) -> str:
    """The ``tgi_request_failure{err=...}`` label of an error answer (TGI's labels where it has one)."""
    return {413: "validation", 422: "validation", 424: "generation", 429: "overloaded",
            500: "internal"}.get(exc.status, exc.error_type)


def unauthorized() -> APIError:
    return APIError(401, "Unauthorized: missing or invalid `Authorization: Bearer` token", "unauthorized")


def _describe(exc: RequestValidationError) -> str:
    """One line per pydantic error: ``parameters.max_new_tokens: Input should be a valid integer``."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        where = ".".join(loc) or "body"
        parts.append(f"`{where}`: {err.get('msg', 'invalid value')}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request body"


def install_error_handlers(app: FastAPI, on_validation_error=None) -> None:
    """Route every error through :class:`APIError`. ``on_validation_error()`` counts it in metrics."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if on_validation_error is not None:
            on_validation_error(request)
        return validation_error(_describe(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's "error parsing the body": a body that is not UTF-8, nests deeper than the JSON
            # parser allows or holds an integer too long to convert. Malformed input: a 422 like bad JSON.
            if on_validation_error is not None:
                on_validation_error(request)
            cause = exc.__cause__
            why = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc.detail)
            return validation_error(f"malformed request body: {why}"[:500]).response()
        kinds = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}
        return JSONResponse({"error": str(exc.detail), "error_type": kinds.get(exc.status_code, "http")},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette calls this from its outermost middleware and then re-raises for the server's log.
        return internal_error(exc).response()
