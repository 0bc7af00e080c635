"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.

Shapes follow OpenAI's API as TGI serves it (``router/src/server.rs``: ``chat_completions``,
``completions``; ``router/src/lib.rs``: ``ChatCompletion``, ``ChatCompletionChunk``, ``Usage``):
``system_fingerprint`` is ``"<version>-native"``, streams end with ``data: [DONE]``, and with
``stream_options.include_usage`` a last chunk with empty ``choices`` carries ``usage``. Unlike TGI we
honour ``n`` and report OpenAI's ``finish_reason`` vocabulary (``stop``/``length``) for stop strings too;
as vLLM does, each choice's ``stop_reason`` names the stop string that ended it (null for EOS).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine.grammar import KINDS as CONSTRAINT_KINDS
from ..engine.outputs import StreamEvent
from .encoding import JSONResponse
from .errors import ERROR_RESPONSES, openai_error_frame, validation_error
from .generation import (Generation, SSEResponse, check_text_length, collect, merge, openai_finish_reason, sse,
                         start, tokenize_text)
from .guard import guarded
from .openai_schemas import (ChatCompletion, ChatRequest, ChatTokenizeResponse, Completion, CompletionRequest,
                             ModelCard, ModelList)
from .state import ServerState, state_of
from .tools import AutoStream, ToolPlan, parse_output, plan_tools, tool_prompt
from .tools import constraint as tool_constraint
from .validation import chat_messages, chat_params, completion_params, completion_prompts, openai_adapter

router = APIRouter()
_STREAM = {"text/event-stream": {}}


def _logprob_entry(state: ServerState, token_id: int, logprob: float | None,
                   top: list[tuple[int, float]] | None) -> dict:
    text = state.token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": state.token_text(t), "logprob": lp, "bytes": list(state.token_text(t).encode())}
                             for t, lp in (top or [])]}


def _legacy_logprobs(state: ServerState, events: list[StreamEvent], offset: int) -> dict:
    """``/v1/completions`` logprobs: parallel lists, as OpenAI's legacy API returns them."""
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        tokens.append(state.token_text(ev.token_id))
        lps.append(ev.logprob)
        tops.append({state.token_text(t): lp for t, lp in (ev.top_logprobs or [])})
        offsets.append(offset)
        offset += len(ev.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _usage(gens: list[Generation], generated: bool = True) -> dict:
    prompt = sum(g.input_length for g in gens)
    done = sum(len(o.token_ids) for g in gens if g.output for o in g.output.outputs) if generated else 0
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _envelope(state: ServerState, kind: str, rid: str, model: str | None) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model or state.info.model_id,
            "system_fingerprint": f"{state.info.version}-native"}


def _raise_failed(gens: list[Generation]) -> None:
    for g in gens:
        g.raise_failure()


# ---------------------------------------------------------------------------- chat
@router.post("/v1/chat/completions", responses={200: {"model": ChatCompletion, "content": _STREAM},
                                                **ERROR_RESPONSES})
@guarded()
async def chat_completions(req: ChatRequest, request: Request) -> Response:
    state = state_of(request)
    kwargs = chat_params(req, state.limits) | openai_adapter(req.model, state.pipe.adapter_names)
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    if plan is not None and plan.calls_tools:
        if any(kwargs.get(k) is not None for k in CONSTRAINT_KINDS):
            raise validation_error("`tools` cannot be combined with `response_format`")
        kwargs.update(tool_constraint(plan))
    messages, template = tool_prompt(chat_messages(req.messages), plan, state.pipe.tokenizer)
    gens, permit = await start(state, request, [messages], kwargs, template=template)
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if req.stream:
        return SSEResponse(_chat_stream(state, gens[0], req, rid, plan), permit, gens, openai_error_frame)
    try:
        (events,) = await collect(gens, request)
    finally:
        permit.release()
    _raise_failed(gens)
    gen = gens[0]
    choices = []
    for out in gen.output.outputs:
        toks = [ev for ev in events if ev.token_id is not None and ev.index == out.index]
        logprobs = {"content": [_logprob_entry(state, ev.token_id, ev.logprob, ev.top_logprobs) for ev in toks]} \
            if req.logprobs else None
        message, reason = {"role": "assistant", "content": out.text}, openai_finish_reason(out.finish_reason)
        if plan is not None and plan.calls_tools:
            content, calls = parse_output(out.text, plan)
            if calls:
                message, reason = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        choices.append({"index": out.index, "message": message, "logprobs": logprobs, "finish_reason": reason,
                        "stop_reason": out.stop_string})
    body = {**_envelope(state, "chat.completion", rid, req.model), "choices": choices, "usage": _usage(gens)}
    return JSONResponse(body)


async def _chat_stream(state: ServerState, gen: Generation, req: ChatRequest, rid: str,
                       plan: ToolPlan | None) -> AsyncIterator[bytes]:
    env = _envelope(state, "chat.completion.chunk", rid, req.model)
    tools = plan is not None and plan.calls_tools
    # With tools, content is held back where it may be a call (auto) or is the call itself (required,
    # named); the calls go out as one `delta.tool_calls` chunk when the choice ends.
    held: dict[int, AutoStream] = {}
    async with aclosing(gen.events()) as events:
        async for ev in events:
            if ev.finished and gen.failure is not None:
                yield sse(openai_error_frame(gen.failure))
                return
            if ev.token_id is None:
                continue
            logprobs = {"content": [_logprob_entry(state, ev.token_id, ev.logprob, ev.top_logprobs)]} \
                if req.logprobs else None
            text, reason, delta = ev.text, openai_finish_reason(ev.finish_reason), {"role": "assistant"}
            if tools:
                auto = held.setdefault(ev.index, AutoStream())
                text = auto.push(text) if plan.mode == "auto" else ""
                if plan.mode != "auto":
                    auto.text += ev.text
                if ev.finish_reason is not None:
                    content, calls = parse_output(auto.text, plan, strip=False)
                    if calls:
                        delta["tool_calls"] = [dict(c, index=k) for k, c in enumerate(calls)]
                        reason = "tool_calls"
                        sent = auto.text[:auto.sent]
                        if plan.mode == "auto" and content and content.startswith(sent):
                            text += content[len(sent):]  # text after or between the calls, as unstreamed
                    else:  # no call after all: what was held back is content
                        text += auto.text[auto.sent:] if plan.mode == "auto" else auto.text
            delta["content"] = text
            choice = {"index": ev.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
                      "stop_reason": ev.stop_string}
            yield sse({**env, "choices": [choice], "usage": None})
    if req.stream_options is not None and req.stream_options.include_usage:
        yield sse({**env, "choices": [], "usage": _usage([gen])})
    yield sse("[DONE]")


# ---------------------------------------------------------------------------- completions
@router.post("/v1/completions", responses={200: {"model": Completion, "content": _STREAM}, **ERROR_RESPONSES})
@guarded()
async def completions(req: CompletionRequest, request: Request) -> Response:
    state = state_of(request)
    kwargs = completion_params(req, state.limits) | openai_adapter(req.model, state.pipe.adapter_names)
    prompts = completion_prompts(req.prompt, state.limits)
    gens, permit = await start(state, request, prompts, kwargs)
    n = kwargs["num_return_sequences"]
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    echoes = [_echo(state, p) if req.echo else "" for p in prompts]
    if req.stream:
        return SSEResponse(_completion_stream(state, gens, req, rid, n, echoes), permit, gens, openai_error_frame)
    try:
        all_events = await collect(gens, request)
    finally:
        permit.release()
    _raise_failed(gens)
    scoring = bool(req.echo) and req.max_tokens == 0  # the prompt alone (scored with logprobs), as validated
    choices = []
    for i, (gen, events) in enumerate(zip(gens, all_events, strict=True)):
        for out in gen.output.outputs:
            toks = [] if scoring else [ev for ev in events if ev.token_id is not None and ev.index == out.index]
            logprobs = None
            if req.logprobs is not None:
                logprobs = _legacy_logprobs(state, toks, len(echoes[i]))
                if gen.output.prompt_logprobs is not None:
                    logprobs = _with_prompt(state, gen, logprobs)
            choices.append({"index": i * n + out.index, "text": echoes[i] + ("" if scoring else out.text),
                            "logprobs": logprobs, "finish_reason": openai_finish_reason(out.finish_reason),
                            "stop_reason": out.stop_string})
    body = {**_envelope(state, "text_completion", rid, req.model), "choices": choices,
            "usage": _usage(gens, generated=not scoring)}
    return JSONResponse(body)


def _with_prompt(state: ServerState, gen: Generation, generated: dict) -> dict:
    """Legacy logprobs with the echoed prompt's tokens first (the first token's logprob is null)."""
    prompt = _prompt_logprobs(state, gen.handle.prompt_ids, gen.output.prompt_logprobs)
    return {k: prompt[k] + generated[k] for k in prompt}


def _prompt_logprobs(state: ServerState, ids: list[int], entries: list) -> dict:
    """The prompt's part of legacy logprobs, from ``RequestOutput.prompt_logprobs``-shaped ``entries``."""
    tokens, lps, tops, offsets, offset = [], [], [], [], 0
    for t, entry in zip(ids, entries, strict=True):
        text = state.token_text(t)
        tokens.append(text)
        lps.append(None if entry is None else entry[0])
        tops.append(None if entry is None else {state.token_text(a): lp for a, lp in entry[1]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _echo(state: ServerState, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else state.pipe.tokenizer.decode(prompt)


async def _completion_stream(state: ServerState, gens: list[Generation], req: CompletionRequest, rid: str,
                             n: int, echoes: list[str]) -> AsyncIterator[bytes]:
    env = _envelope(state, "text_completion", rid, req.model)
    offsets: dict[int, int] = {}
    # With logprobs the echo waits for the first token event, which carries the prompt's logprobs (as the
    # response without streaming has them); else it goes out at once.
    held = set(range(len(echoes))) if req.logprobs is not None and req.echo else set()

    def echo_chunks(i: int, prompt_lps: list | None) -> Iterator[bytes]:
        logprobs = _prompt_logprobs(state, gens[i].handle.prompt_ids, prompt_lps) if prompt_lps else None
        for j in range(n):
            offsets[i * n + j] = len(echoes[i])
            if echoes[i] or logprobs:  # a prompt that decodes to "" still has its tokens' logprobs
                yield sse({**env, "choices": [{"index": i * n + j, "text": echoes[i], "logprobs": logprobs,
                                               "finish_reason": None}]})

    for i in range(len(echoes)):
        if i not in held:
            for chunk in echo_chunks(i, None):
                yield chunk
    async with aclosing(merge(gens)) as events:
        async for i, ev in events:
            if ev.finished and gens[i].failure is not None:  # merge reads ahead: not at an earlier event
                yield sse(openai_error_frame(gens[i].failure))
                return
            if i in held:
                held.discard(i)
                prompt_lps = ev.prompt_logprobs or (ev.output.prompt_logprobs if ev.output is not None else None)
                for chunk in echo_chunks(i, prompt_lps):
                    yield chunk
            if ev.token_id is None:
                continue
            index = i * n + ev.index
            logprobs = _legacy_logprobs(state, [ev], offsets[index]) if req.logprobs is not None else None
            offsets[index] += len(ev.text)
            yield sse({**env, "choices": [{"index": index, "text": ev.text, "logprobs": logprobs,
                                           "finish_reason": openai_finish_reason(ev.finish_reason),
                                           "stop_reason": ev.stop_string}]})
    if req.stream_options is not None and req.stream_options.include_usage:
        yield sse({**env, "choices": [], "usage": _usage(gens)})
    yield sse("[DONE]")


@router.post("/chat_tokenize", responses={200: {"model": ChatTokenizeResponse}, **ERROR_RESPONSES})
@guarded(counted=False)
async def chat_tokenize(req: ChatRequest, request: Request) -> Response:
    """TGI's ``/chat_tokenize``: the chat template applied to ``messages``, with ``tools`` shown as a chat
    completion shows them, and its tokens."""
    state = state_of(request)
    tok = state.pipe.tokenizer
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    messages, template = tool_prompt(chat_messages(req.messages), plan, tok)

    def run() -> dict:
        check_text_length(state, messages)
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template)
        except Exception as exc:  # a template that cannot render these messages
            raise validation_error(f"chat template: {type(exc).__name__}: {exc}") from None
        return {"tokenize_response": tokenize_text(state, text, add_special_tokens=False), "templated_text": text}

    return JSONResponse(await state.off_loop(run))


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> Response:
    state = state_of(request)
    info = state.info
    cards = [ModelCard(id=info.model_id, owned_by=info.model_id, root=info.model_id)]
    cards += [ModelCard(id=a.name, owned_by=info.model_id, root=a.path or a.name, parent=info.model_id)
              for a in state.pipe.adapters.loaded()]
    return JSONResponse(ModelList(data=cards).model_dump())
