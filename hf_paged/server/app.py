"""The FastAPI app: TGI routes, OpenAI routes, metrics, engine views and the Gradio UI on one server.

Example::

    import uvicorn
    from hf_paged.engine.pipeline import PagedPipeline
    from hf_paged.server import create_app

    pipe = PagedPipeline.from_pretrained("default", kv_memory="1GiB")
    uvicorn.run(create_app(pipe, model_id="SmolLM2-135M-Instruct"), host="127.0.0.1", port=8080)
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from .. import __version__
from ..engine.pipeline import PagedPipeline
from .encoding import JSONResponse
from .engine_view import LocalEngineClient, blocks_payload, stats_payload
from .errors import install_error_handlers
from .generation import default_max_new_tokens
from .metrics import CONTENT_TYPE, ServerMetrics
from .middleware import GENERATION_ROUTES, BearerAuth, BodyLimit, Options, route_path
from .openai_routes import router as openai_router
from .schemas import Info
from .state import ServerState
from .tgi_routes import router as tgi_router
from .validation import Limits

logger = logging.getLogger(__name__)

UI_PATH = "/ui"
DEFAULT_MAX_CONCURRENT_REQUESTS = 128  # TGI's default; counts sequences
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_N = 16


def _limits(pipe: PagedPipeline, max_input_tokens: int | None, max_n: int) -> Limits:
    # One sequence can never outgrow the model's context nor the whole KV pool.
    capacity = pipe.pool.num_blocks * pipe.pool.block_size
    max_total = min(pipe.max_model_len, capacity)
    max_input = max_total - 1 if max_input_tokens is None else max_input_tokens
    if not 0 < max_input < max_total:
        raise ValueError(f"max_input_tokens must be in [1, {max_total - 1}] (the model context / KV pool allows "
                         f"{max_total} tokens in all), got {max_input_tokens}")
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    return Limits(max_input_tokens=max_input, max_total_tokens=max_total,
                  default_max_new_tokens=default_max_new_tokens(pipe), max_n=max_n)


def create_app(pipe: PagedPipeline, *, model_id: str, max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
               api_key: str | None = None, max_input_tokens: int | None = None, ui: bool = True,
               close_pipeline: bool = True, model_sha: str | None = None,
               model_pipeline_tag: str | None = "text-generation", max_n: int = DEFAULT_MAX_N,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, validation_workers: int = 2) -> FastAPI:
    """A FastAPI app serving ``pipe``. On shutdown it cancels every request and closes ``pipe``
    (unless ``close_pipeline=False``, for several apps sharing one pipeline).

    ``max_concurrent_requests`` counts sequences (a request with ``n=4`` holds 4); ``max_n`` bounds
    ``n`` per request; a body over ``max_body_bytes`` gets 413; tokenizing runs on
    ``validation_workers`` threads."""
    if max_concurrent_requests < 1:
        raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
    if max_body_bytes < 1 or validation_workers < 1:
        raise ValueError(f"max_body_bytes and validation_workers must be >= 1, got {max_body_bytes} and "
                         f"{validation_workers}")
    limits = _limits(pipe, max_input_tokens, max_n)
    info = Info(model_id=model_id, model_sha=model_sha, model_pipeline_tag=model_pipeline_tag,
                max_concurrent_requests=max_concurrent_requests, max_best_of=1,
                max_stop_sequences=limits.max_stop_sequences, max_input_tokens=limits.max_input_tokens,
                max_total_tokens=limits.max_total_tokens, validation_workers=validation_workers,
                max_client_batch_size=limits.max_client_batch_size, router="hf_paged", version=__version__,
                sha=None, docker_label=None)
    metrics = ServerMetrics(pipe.stats, max_input_tokens=limits.max_input_tokens,
                            max_total_tokens=limits.max_total_tokens)
    state = ServerState(pipe=pipe, info=info, limits=limits, metrics=metrics,
                        compute_type=next(pipe.model.parameters()).device.type)
    metrics.bind_in_flight(lambda: state.in_flight)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await state.shutdown()
        if close_pipeline:
            await asyncio.to_thread(pipe.close)

    app = FastAPI(title="hf_paged", version=__version__, lifespan=lifespan, default_response_class=JSONResponse)
    app.state.hf_paged = state

    def count_rejected(path: str) -> None:
        # A generation request refused before its route ran (bad JSON, wrong types, too large).
        if path in GENERATION_ROUTES - {"/tokenize", "/chat_tokenize"}:
            metrics.request()
            metrics.failure("validation")

    def on_validation_error(request: Request) -> None:
        if request.method == "POST":
            count_rejected(route_path(request.scope))

    install_error_handlers(app, on_validation_error)
    app.include_router(tgi_router)
    app.include_router(openai_router)

    @app.get("/metrics", response_class=PlainTextResponse)
    @app.head("/metrics", response_class=PlainTextResponse, include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/engine/stats")
    async def engine_stats() -> JSONResponse:
        return JSONResponse(stats_payload(pipe, model_id=model_id, in_flight=state.in_flight,
                                          max_concurrent_requests=max_concurrent_requests))

    @app.get("/engine/blocks")
    async def engine_blocks() -> JSONResponse:
        return JSONResponse(blocks_payload(pipe))

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, on_reject=count_rejected)
    if api_key:
        # Outermost: no body is read without the key. The UI asks for the key as its password.
        app.add_middleware(BearerAuth, api_key=api_key, open_prefix=UI_PATH if ui else None)
    app.add_middleware(Options, router_app=app)
    if ui:
        _mount_ui(app, LocalEngineClient(pipe, model_id, state), api_key)
    return app


def _mount_ui(app: FastAPI, client: LocalEngineClient, api_key: str | None) -> None:
    try:
        from .. import ui as demo
    except ImportError:
        logger.warning("gradio is not installed (pip install 'hf-paged[demo]'): no UI at %s", UI_PATH)
        return
    # With an API key the UI asks for it as the password: it can generate, so it must not be open.
    auth = (lambda _user, password: hmac.compare_digest(password, api_key)) if api_key else None
    demo.mount(app, client, path=UI_PATH, auth=auth)
