"""What every generation route shares: validation and tokenizing, submission and event consumption.

A request is admitted (concurrency slots, TGI's 429: :mod:`~hf_paged.server.state`), validated and
tokenized (on a validation worker), then submitted to the engine; nothing is queued before validation
passed. Its events are consumed either by an SSE generator (Starlette cancels that generator when the
client goes away) or by :func:`collect`, which polls for a disconnect itself since nothing else would
notice one while a non-streaming request runs. Either way a request nobody listens to any more is
cancelled, so its KV blocks return to the pool.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from ..engine.grammar import KINDS as CONSTRAINT_KINDS
from ..engine.grammar import normalize as normalize_constraint
from ..engine.outputs import FinishReason, RequestOutput, StreamEvent
from ..engine.params import SamplingParams
from ..engine.pipeline import PagedPipeline
from ..engine.request import Request
from .encoding import dumps
from .errors import APIError, ClientGone, generation_error, internal_error, validation_error
from .guard import Outcome
from .state import Permit, ServerState

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def finish_reason(reason: FinishReason | None, stop_string: str | None) -> str:
    """Engine reason -> TGI's: ``length``, ``eos_token`` or ``stop_sequence`` (the engine reports
    which stop string ended a sequence; None means EOS)."""
    if reason is FinishReason.STOP:
        return "eos_token" if stop_string is None else "stop_sequence"
    return str(reason or "length")


def openai_finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's vocabulary: ``length``, else ``stop`` (EOS, stop string, cancel); None while running."""
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"


class Generation:
    """One engine request as the HTTP layer sees it: its events and timings, reported to the HTTP
    request's :class:`~hf_paged.server.guard.Outcome`."""

    def __init__(self, handle: Request, outcome: Outcome, started: float, submitted: float) -> None:
        self.handle = handle
        self.outcome = outcome
        self.started = started
        self.submitted = submitted
        self.first_token: float | None = None
        self.output: RequestOutput | None = None
        # Why the request ended without its result, as the client is answered (a stream's error frame):
        # the engine's failure (424), or a cancel by the server, which only shutting down does (503).
        self.failure: APIError | None = None

    def raise_failure(self) -> None:
        """After its last event: raise what the client is answered if the request has no result."""
        if self.failure is not None:
            raise self.failure
        if self.output is None:
            raise generation_error("the engine ended the request without a result")

    @property
    def input_length(self) -> int:
        return len(self.handle.prompt_ids)

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The request's events; leaving early (or being cancelled) cancels the request."""
        ended = False
        try:
            # aclosing: the handle's own cleanup must run now, not whenever the generator is collected.
            async with aclosing(self.handle.__aiter__()) as handle_events:
                async for ev in handle_events:
                    if ev.token_id is not None and self.first_token is None:
                        self.first_token = time.monotonic()
                    if ev.finished:
                        ended = True
                        self._finished(ev)
                    yield ev
        finally:
            # Not `handle.done`: the engine thread may set it just after our loop saw the last event.
            if not ended:
                self.handle.cancel()
                self.outcome.fail("cancelled")

    def _finished(self, ev: StreamEvent) -> None:
        self.output = ev.output
        if ev.error is not None:
            self.failure = generation_error(ev.error)
            self.outcome.fail("generation")
            return
        if any(o.finish_reason == "cancelled" for o in ev.output.outputs):
            # Cancelled from elsewhere while we still listen: the server shuts down (serving.DrainingServer).
            n = sum(len(o.token_ids) for o in ev.output.outputs)
            self.failure = APIError(503, f"Server is shutting down: the request was cancelled after {n} generated "
                                         "tokens", "unhealthy")
            self.outcome.fail("cancelled")
            return
        now = time.monotonic()
        first = self.first_token or now
        self.outcome.generations.append(dict(
            total=now - self.started, validation=self.submitted - self.started, queue=first - self.submitted,
            inference=now - first, generated_tokens=sum(len(o.token_ids) for o in ev.output.outputs)))


async def start(state: ServerState, http: HTTPRequest, prompts: Sequence[Any], kwargs: dict[str, Any], *,
                truncate: int | None = None, template: dict[str, Any] | None = None) -> tuple[list[Generation], Permit]:
    """Admit (one slot per sequence), tokenize every prompt, then submit them all or none.

    ``kwargs`` were validated by the route already, so a malformed request never takes a slot.
    The slots come back to the caller, who releases them (or hands them to an :class:`SSEResponse`);
    on any failure here they are released before the error propagates."""
    started = time.monotonic()
    permit = state.acquire(len(prompts) * kwargs.get("num_return_sequences", 1))
    with permit.held_until_handed_over():
        prepared = await prepare_all(state, prompts, kwargs, truncate=truncate, template=template)
        gens: list[Generation] = []
        try:
            for ids, kw in prepared:
                gens.append(submit(state, ids, kw, http.state.outcome, started))
        except BaseException:
            for g in gens:
                g.handle.cancel()
            raise
        return gens, permit


async def prepare_all(state: ServerState, prompts: Sequence[Any], kwargs: dict[str, Any], *,
                      truncate: int | None = None,
                      template: dict[str, Any] | None = None) -> list[tuple[list[int], dict[str, Any]]]:
    """:func:`prepare` for each prompt, on the validation workers (tokenizing is CPU-heavy); then the
    request's constraint, compiled on the grammar worker (:meth:`ServerState.compile_grammar`)."""
    prepared = await state.off_loop(lambda: [prepare(state, p, kwargs, truncate=truncate, template=template)
                                             for p in prompts])
    given = [(k, kwargs[k]) for k in CONSTRAINT_KINDS if kwargs.get(k) is not None]
    if len(given) == 1:  # more than one: SamplingParams refuses the request at submit
        try:
            constraint = normalize_constraint(*given[0])
        except ValueError as exc:
            raise validation_error(str(exc)) from None
        await state.compile_grammar(constraint)  # the engine's submit finds it compiled
    return prepared


def prepare(state: ServerState, prompt: Any, kwargs: dict[str, Any], *, truncate: int | None = None,
            template: dict[str, Any] | None = None) -> tuple[list[int], dict[str, Any]]:
    """Token ids and final kwargs: TGI's input/total token limits, truncation, default max_new_tokens.
    Runs on a validation worker (:func:`prepare_all`), never on the event loop."""
    limits = state.limits
    if isinstance(prompt, str) and truncate is not None:
        # TGI keeps the last `truncate` tokens; they lie within the last truncate * max_token_chars
        # characters, so a huge text is cut (with a margin for the cut's first word) before tokenizing.
        prompt = prompt[-(truncate + 8) * state.max_token_chars:]
    else:
        check_text_length(state, prompt)
    try:
        ids = state.pipe.encode(prompt, **(template or {}))  # template: chat-template kwargs (tools)
    except ValueError as exc:
        raise validation_error(str(exc)) from None
    if not ids:
        raise validation_error("`inputs` cannot be empty")
    if truncate is not None:
        ids = ids[-truncate:]  # TGI keeps the end of the prompt
    n = len(ids)
    if n > limits.max_input_tokens:
        raise validation_error(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {n}")
    kwargs = dict(kwargs)
    max_new = kwargs.get("max_new_tokens")
    if max_new is None:
        max_new = max(1, min(limits.default_max_new_tokens, limits.max_total_tokens - n))
        kwargs["max_new_tokens"] = max_new
    if n + max_new > limits.max_total_tokens:
        raise validation_error(f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                               f"Given: {n} `inputs` tokens and {max_new} `max_new_tokens`")
    return ids, kwargs


def check_text_length(state: ServerState, prompt: Any) -> None:
    """Refuses, without tokenizing it, a prompt whose text alone must exceed ``max_input_tokens``.

    Tokenizing costs time on a worker and, while the token lists are built, the GIL: a 4 MB text
    would hold it for a quarter of a second. No token covers more than ``state.max_token_chars``
    characters, so longer texts need more tokens than allowed whatever they hold.
    """
    limit = state.limits.max_input_tokens
    if isinstance(prompt, str):
        chars = len(prompt)
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        chars = sum(len(m["content"]) for m in prompt if isinstance(m.get("content"), str))
        if len(prompt) > limit:  # a chat template spends a token or more on every message
            raise validation_error(f"`messages` must make less than {limit} tokens. Given: {len(prompt)} messages, "
                                   f"at least a token each")
    else:
        return
    if chars > limit * state.max_token_chars:
        raise validation_error(f"`inputs` must have less than {limit} tokens. Given: {chars} characters, "
                               f"at least {-(-chars // state.max_token_chars)} tokens")


def tokenize_text(state: ServerState, text: str, add_special_tokens: bool = True) -> list[dict]:
    """TGI's token list (``id``, ``text``, ``start``, ``stop``: character offsets) of ``text``, which
    must fit ``max_input_tokens`` (no route would take more). Runs on a validation worker. A templated
    chat already holds its special tokens (``add_special_tokens=False``)."""
    enc = state.pipe.tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    if len(enc["input_ids"]) > state.limits.max_input_tokens:
        raise validation_error(f"`inputs` must have less than {state.limits.max_input_tokens} tokens. "
                               f"Given: {len(enc['input_ids'])}")
    return [{"id": i, "text": text[a:b], "start": a, "stop": b}
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def submit(state: ServerState, ids: list[int], kwargs: dict[str, Any], outcome: Outcome, started: float) -> Generation:
    """Queue a validated request; the engine's own checks (SamplingParams) still answer 422."""
    if state.requests_cancelled:  # validated after the shutdown's drain ended: nothing would cancel it
        raise APIError(503, "Server is shutting down", "unhealthy")
    try:
        handle = state.pipe.submit(ids, **kwargs)
    except ValueError as exc:
        raise validation_error(str(exc)) from None
    except RuntimeError as exc:
        if state.pipe.alive:
            raise  # not the closed pipeline: a bug, answered 500 by the route's guard
        raise APIError(503, str(exc), "unhealthy") from None  # closed under us: shutting down
    state.track(handle)
    state.metrics.input_length.observe(len(ids))
    state.metrics.max_new_tokens.observe(handle.params.max_new_tokens)
    return Generation(handle, outcome, started, time.monotonic())


def default_max_new_tokens(pipe: PagedPipeline) -> int:
    """What ``generate()`` would use for this model (its generation_config), else the engine default."""
    try:
        return SamplingParams.from_request(pipe.model.generation_config).max_new_tokens
    except ValueError:
        return SamplingParams.from_request(None).max_new_tokens


async def collect(gens: list[Generation], http_request: HTTPRequest) -> list[list[StreamEvent]]:
    """All events of each generation; cancels them all if the client disconnects meanwhile."""

    async def drain(g: Generation) -> list[StreamEvent]:
        async with aclosing(g.events()) as events:
            return [ev async for ev in events]

    tasks = [asyncio.ensure_future(drain(g)) for g in gens]
    try:
        while True:
            _, pending = await asyncio.wait(tasks, timeout=DISCONNECT_POLL_S)
            if not pending:
                return [t.result() for t in tasks]
            if await http_request.is_disconnected():
                raise ClientGone()
    finally:
        for t in tasks:
            t.cancel()  # drain's `finally` cancels an unfinished engine request
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge(gens: list[Generation]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """Events of several generations as they come, tagged with the generation's position."""
    if len(gens) == 1:
        async with aclosing(gens[0].events()) as events:
            async for ev in events:
                yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, StreamEvent | None]] = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async with aclosing(g.events()) as events:
                async for ev in events:
                    await queue.put((i, ev))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, ev = await queue.get()
            if ev is None:
                remaining -= 1
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


ErrorFrame = Callable[[APIError], dict]


class SSEResponse(StreamingResponse):
    """An SSE stream that frees its permit and cancels its requests however the response ends, even
    when the body was never iterated (a client gone before the first byte). A bug while streaming
    ends the stream with ``error_frame(internal error)`` as its last event, counted as ``internal``;
    the request's outcome is counted when the response ends, however it ends."""

    counts_its_outcome = True  # the route guard leaves the outcome to the stream

    def __init__(self, body: AsyncIterator[bytes], permit: Permit, gens: list[Generation],
                 error_frame: ErrorFrame, headers: dict[str, str] | None = None) -> None:
        super().__init__(_guarded(body, error_frame, gens[0].outcome), media_type="text/event-stream",
                         headers={**SSE_HEADERS, **(headers or {})})
        self._permit = permit
        self._gens = gens

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # runs the generator's cleanup if it was started
            for g in self._gens:
                if g.output is None:  # no final event seen: nobody will read the rest
                    g.handle.cancel()
                    g.outcome.fail("cancelled")
            self._permit.release()
            self._gens[0].outcome.finish()


async def _guarded(body: AsyncIterator[bytes], error_frame: ErrorFrame, outcome: Outcome) -> AsyncIterator[bytes]:
    async with aclosing(body) as frames:
        try:
            async for frame in frames:
                yield frame
        except Exception as exc:  # a bug: the client still gets a well-formed last event
            logger.exception("stream failed")
            outcome.fail("internal")
            yield sse(error_frame(internal_error(exc)))



def sse(data: Any) -> bytes:
    """One Server-Sent Event frame (JSON without NaN, see :func:`~hf_paged.server.encoding.dumps`)."""
    text = data if isinstance(data, str) else dumps(data)
    return f"data: {text}\n\n".encode()

