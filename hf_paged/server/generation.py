"""What every generation route shares: the app's state, admission, submission and event consumption.

A request is admitted (concurrency permit, TGI's 429), validated and tokenized, then submitted to the
engine; nothing is queued before validation passed. Its events are consumed either by an SSE generator
(Starlette cancels that generator when the client goes away) or by :func:`collect`, which polls for a
disconnect itself since nothing else would notice one while a non-streaming request runs. Either way a
request nobody listens to any more is cancelled, so its KV blocks return to the pool.
"""
from __future__ import annotations

import asyncio
import functools
import json
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from ..engine.outputs import RequestOutput, StreamEvent
from ..engine.params import SamplingParams
from ..engine.pipeline import PagedPipeline
from ..engine.request import Request
from .errors import APIError, ClientGone, overloaded, validation_error
from .metrics import ServerMetrics
from .schemas import Info
from .validation import Limits

DISCONNECT_POLL_S = 0.5
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(slots=True, eq=False)
class ServerState:
    pipe: PagedPipeline
    info: Info
    limits: Limits
    metrics: ServerMetrics
    compute_type: str = "cpu"
    in_flight: int = 0
    # Every submitted request still alive (the engine holds running ones); shutdown waits on them.
    handles: weakref.WeakSet[Request] = field(default_factory=weakref.WeakSet)
    closing: bool = False
    special_ids: frozenset[int] = frozenset()
    token_text: Any = None  # token id -> its string (set in __post_init__)

    def __post_init__(self) -> None:
        self.special_ids = frozenset(getattr(self.pipe.tokenizer, "all_special_ids", ()) or ())
        # Per-token strings (logprobs, top tokens) are looked up over and over; the vocabulary is fixed.
        self.token_text = functools.lru_cache(maxsize=65536)(self._token_text)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel every request and wait until the engine delivered their last events: the engine
        thread must not post to this event loop once it is closed."""
        self.closing = True
        pending = [h for h in list(self.handles) if not h.done]
        for h in pending:
            h.cancel()
        deadline = time.monotonic() + timeout
        while any(not h.done for h in pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def healthy(self) -> bool:
        """False while shutting down or once the engine thread died (requests would hang forever)."""
        return not self.closing and self.pipe.alive

    def _token_text(self, token_id: int) -> str:
        return self.pipe.tokenizer.decode([token_id], skip_special_tokens=False)

    # ------------------------------------------------------------------ admission (TGI: a semaphore)
    def acquire(self) -> "Permit":
        if self.closing:
            raise APIError(503, "Server is shutting down", "unhealthy")
        if self.in_flight >= self.info.max_concurrent_requests:
            self.metrics.failure("overloaded")
            raise overloaded()
        self.in_flight += 1
        return Permit(self)


class Permit:
    """One in-flight slot; ``release()`` may be called from several cleanup paths, it counts once."""

    def __init__(self, state: ServerState) -> None:
        self._state: ServerState | None = state

    def release(self) -> None:
        if self._state is not None:
            self._state.in_flight -= 1
            self._state = None


def finish_reason(token_id: int | None, reason: str | None, eos_ids: Sequence[int]) -> str:
    """Engine reason -> TGI's: ``length``, ``eos_token`` or ``stop_sequence``.

    The engine says "stop" for both an EOS token and a stop string; the last token tells them apart.
    """
    if reason == "stop":
        return "eos_token" if token_id in eos_ids else "stop_sequence"
    return reason or "length"


def openai_finish_reason(tgi_reason: str) -> str:
    return "length" if tgi_reason == "length" else "stop"


class Generation:
    """One engine request as the HTTP layer sees it: its events, timings and metrics."""

    def __init__(self, state: ServerState, handle: Request, started: float, submitted: float) -> None:
        self.state = state
        self.handle = handle
        self.started = started
        self.submitted = submitted
        self.first_token: float | None = None
        self.output: RequestOutput | None = None
        self.error: str | None = None

    @property
    def input_length(self) -> int:
        return len(self.handle.prompt_ids)

    @property
    def eos_ids(self) -> list[int]:
        return self.handle.params.eos_token_id

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
                self.state.metrics.failure("cancelled")

    def _finished(self, ev: StreamEvent) -> None:
        self.output = ev.output
        m = self.state.metrics
        if ev.error is not None:
            self.error = ev.error
            m.failure("generation")
            return
        if any(o.finish_reason == "cancelled" for o in ev.output.outputs):
            m.failure("cancelled")  # cancelled from elsewhere (shutdown)
            return
        now = time.monotonic()
        first = self.first_token or now
        m.success(total=now - self.started, validation=self.submitted - self.started,
                  queue=first - self.submitted, inference=now - first,
                  generated_tokens=sum(len(o.token_ids) for o in ev.output.outputs))


def prepare(state: ServerState, prompt: Any, kwargs: dict[str, Any], *,
            truncate: int | None = None) -> tuple[list[int], dict[str, Any]]:
    """Token ids and final kwargs: TGI's input/total token limits, truncation, default max_new_tokens."""
    limits = state.limits
    try:
        ids = state.pipe.encode(prompt)
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


def submit(state: ServerState, ids: list[int], kwargs: dict[str, Any], started: float) -> Generation:
    """Queue a validated request; the engine's own checks (SamplingParams) still answer 422."""
    try:
        handle = state.pipe.submit(ids, **kwargs)
    except ValueError as exc:
        raise validation_error(str(exc)) from None
    except RuntimeError as exc:  # pipeline closed under us: shutting down
        raise APIError(503, str(exc), "unhealthy") from None
    state.handles.add(handle)
    state.metrics.input_length.observe(len(ids))
    state.metrics.max_new_tokens.observe(handle.params.max_new_tokens)
    return Generation(state, handle, started, time.monotonic())


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


class SSEResponse(StreamingResponse):
    """An SSE stream that frees its permit and cancels its requests however the response ends, even
    when the body was never iterated (a client gone before the first byte)."""

    def __init__(self, body: AsyncIterator[bytes], permit: Permit, gens: list[Generation],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(body, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
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
            self._permit.release()


def sse(data: Any) -> bytes:
    """One Server-Sent Event frame."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()

