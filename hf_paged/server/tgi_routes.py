"""TGI's routes: ``POST /generate``, ``/generate_stream``, ``/``, ``/tokenize``; ``GET /info``, ``/health``.

Behaviour follows TGI's ``router/src/server.rs``: ``/`` dispatches on ``stream`` and wraps a
non-streamed answer in a one-item list; its ``return_full_text`` defaults to true for a
``text-generation`` model; ``/generate_stream`` sends one ``data: {...}`` frame per token (1-based
``index``) and puts ``generated_text`` and ``details`` on the last one, with no ``[DONE]``.

Deliberate difference: errors known before the first token (validation, overload) are HTTP statuses
(422/429) on the streaming route too, where TGI sends them as an SSE event with status 200.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .encoding import JSONResponse
from .errors import ERROR_RESPONSES, APIError, validation_error
from .generation import (Generation, SSEResponse, check_text_length, collect, finish_reason, sse, start,
                         tokenize_text)
from .guard import guarded
from .schemas import (CompatGenerateRequest, Details, ErrorResponse, GenerateRequest, GenerateResponse, Info,
                      PrefillToken, SimpleToken, StreamDetails, StreamResponse, Token, dump)
from .state import Permit, ServerState, state_of
from .validation import tgi_adapter, tgi_params

router = APIRouter()

GENERATE_RESPONSES = {200: {"model": GenerateResponse}, **ERROR_RESPONSES}
STREAM_RESPONSES = {200: {"content": {"text/event-stream": {}}, "description": "One `data:` frame per token"},
                    **ERROR_RESPONSES}
COMPAT_RESPONSES = {200: {"model": list[GenerateResponse], "content": {"text/event-stream": {}},
                          "description": "A one-item list, or an event stream with `stream: true`"}, **ERROR_RESPONSES}
HEALTH_RESPONSES = {200: {"description": "Healthy (no body)"}, 503: {"model": ErrorResponse}}


def _token(state: ServerState, token_id: int, text: str, logprob: float | None) -> Token:
    return Token(id=token_id, text=text, logprob=logprob, special=token_id in state.special_ids)


def _top_tokens(state: ServerState, top: list[tuple[int, float]] | None) -> list[Token]:
    return [_token(state, t, state.token_text(t), lp) for t, lp in (top or [])]


async def _start(state: ServerState, req: GenerateRequest, http: Request, *,
                 stream: bool) -> tuple[Generation, dict, Permit]:
    """Validate, then admit and submit (validation first: a malformed request never takes a slot)."""
    if not req.inputs:
        raise validation_error("`inputs` cannot be empty")
    kwargs = tgi_params(req.parameters, state.limits, stream=stream)
    kwargs.update(tgi_adapter(req.parameters.adapter_id, state.pipe.adapter_names, state.info.model_id))
    (gen,), permit = await start(state, http, [req.inputs], kwargs, truncate=req.parameters.truncate)
    return gen, kwargs, permit


def _headers(state: ServerState, gen: Generation) -> dict[str, str]:
    """TGI's timing headers (``x-compute-time`` etc.), from the generation's timestamps."""
    now = time.monotonic()
    first = gen.first_token or now
    n = len(gen.output.token_ids) if gen.output else 0
    ms = lambda s: str(int(s * 1000))  # noqa: E731
    return {"x-compute-type": state.compute_type, "x-compute-time": f"{now - gen.started:.6f}",
            "x-total-time": ms(now - gen.started), "x-validation-time": ms(gen.submitted - gen.started),
            "x-queue-time": ms(first - gen.submitted), "x-inference-time": ms(now - first),
            "x-time-per-token": ms((now - first) / max(n, 1)), "x-prompt-tokens": str(gen.input_length),
            "x-generated-tokens": str(n)}


async def _generate(state: ServerState, req: GenerateRequest, http: Request,
                    full_text_default: bool = False) -> tuple[dict, dict[str, str]]:
    gen, kwargs, permit = await _start(state, req, http, stream=False)
    try:
        (events,) = await collect([gen], http)
    finally:
        permit.release()
    gen.raise_failure()
    p = req.parameters
    out = gen.output.outputs[0]
    text = out.text
    if p.return_full_text if p.return_full_text is not None else full_text_default:
        text = req.inputs + text
    details = None
    if p.details or p.decoder_input_details:
        toks = [ev for ev in events if ev.token_id is not None]
        prompt_lps = gen.output.prompt_logprobs or [None] * len(gen.handle.prompt_ids)
        prefill = [PrefillToken(id=t, text=state.token_text(t), logprob=None if e is None else e[0])
                   for t, e in zip(gen.handle.prompt_ids, prompt_lps, strict=True)] if p.decoder_input_details else []
        details = Details(
            finish_reason=finish_reason(out.finish_reason, out.stop_string),
            generated_tokens=len(out.token_ids), seed=kwargs.get("seed"), prefill=prefill,
            tokens=[_token(state, ev.token_id, ev.text, ev.logprob) for ev in toks],
            top_tokens=[_top_tokens(state, ev.top_logprobs) for ev in toks] if kwargs["top_logprobs"] else None)
    return dump(GenerateResponse(generated_text=text, details=details)), _headers(state, gen)


async def _stream(state: ServerState, gen: Generation, req: GenerateRequest, kwargs: dict,
                  full_text_default: bool) -> AsyncIterator[bytes]:
    p = req.parameters
    text: list[str] = []
    index = 0
    ended = False
    async with aclosing(gen.events()) as events:
        async for ev in events:
            if ev.finished and gen.failure is not None:
                yield sse(gen.failure.body())
                ended = True
                break
            if ev.token_id is None:
                continue
            index += 1
            text.append(ev.text)
            frame = StreamResponse(index=index, token=_token(state, ev.token_id, ev.text, ev.logprob),
                                   top_tokens=_top_tokens(state, ev.top_logprobs) or None)
            if ev.finish_reason is not None:
                full = "".join(text)
                if p.return_full_text if p.return_full_text is not None else full_text_default:
                    full = req.inputs + full
                frame.generated_text = full
                if p.details:
                    frame.details = StreamDetails(
                        finish_reason=finish_reason(ev.finish_reason, ev.stop_string),
                        generated_tokens=index, seed=kwargs.get("seed"), input_length=gen.input_length)
                ended = True
            yield sse(dump(frame))
    if not ended:
        gen.outcome.fail("incomplete")
        yield sse(APIError(500, "Incomplete generation stream", "incomplete_generation_stream").body())


async def _generate_stream(state: ServerState, req: GenerateRequest, http: Request,
                           full_text_default: bool) -> Response:
    gen, kwargs, permit = await _start(state, req, http, stream=True)
    return SSEResponse(_stream(state, gen, req, kwargs, full_text_default), permit, [gen], APIError.body,
                       headers={"x-compute-type": state.compute_type})


@router.post("/generate", responses=GENERATE_RESPONSES)
@guarded()
async def generate(req: GenerateRequest, request: Request) -> Response:
    state = state_of(request)
    body, headers = await _generate(state, req, request)
    return JSONResponse(body, headers=headers)


@router.post("/generate_stream", responses=STREAM_RESPONSES)
@guarded()
async def generate_stream(req: GenerateRequest, request: Request) -> Response:
    return await _generate_stream(state_of(request), req, request, full_text_default=False)


@router.post("/", responses=COMPAT_RESPONSES)
@guarded()
async def compat_generate(req: CompatGenerateRequest, request: Request) -> Response:
    state = state_of(request)
    # TGI: return_full_text defaults to true on this route when the model is a text-generation model.
    full = state.info.model_pipeline_tag == "text-generation"
    if req.stream:
        return await _generate_stream(state, req, request, full_text_default=full)
    body, headers = await _generate(state, req, request, full_text_default=full)
    return JSONResponse([body], headers=headers)


def _tokens(state: ServerState, text: str) -> list[dict]:
    check_text_length(state, text)
    return tokenize_text(state, text)


@router.post("/tokenize", responses={200: {"model": list[SimpleToken]}, **ERROR_RESPONSES})
@guarded(counted=False)
async def tokenize(req: GenerateRequest, request: Request) -> Response:
    state = state_of(request)
    if not getattr(state.pipe.tokenizer, "is_fast", False):
        raise APIError(404, "No fast tokenizer available", "tokenizer")
    return JSONResponse(await state.off_loop(_tokens, state, req.inputs))


@router.get("/info", response_model=Info)
async def info(request: Request) -> Response:
    return JSONResponse(state_of(request).info.model_dump())


@router.get("/health", response_class=Response, responses=HEALTH_RESPONSES)
@router.get("/ping", response_class=Response, responses=HEALTH_RESPONSES)
@router.get("/", response_class=Response, responses=HEALTH_RESPONSES)
@router.head("/health", response_class=Response, include_in_schema=False)  # load balancers probe with HEAD
@router.head("/ping", response_class=Response, include_in_schema=False)
@router.head("/", response_class=Response, include_in_schema=False)
async def health(request: Request) -> Response:
    if not state_of(request).healthy():
        raise APIError(503, "unhealthy", "healthcheck")
    return Response(status_code=200)
