"""The app's shared state: the pipeline, the limits, the metrics, admission and the validation workers.

Admission is TGI's semaphore, counted in sequences: a request holds one slot per sequence it runs
(OpenAI ``n`` times its prompts), so ``n`` cannot get around ``max_concurrent_requests``. Tokenizing
and chat templating run on ``validation_workers`` threads (TGI's ``--validation-workers``): the
tokenizers release the GIL, so a megabyte prompt never stalls the event loop and ``/health``.
"""
from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, TypeVar

from fastapi import Request as HTTPRequest

from ..engine.pipeline import PagedPipeline
from ..engine.request import Request
from .errors import APIError, overloaded, validation_error
from .metrics import ServerMetrics
from .schemas import Info
from .validation import Limits

T = TypeVar("T")
# A constraint still compiling after this long is refused (422); its compilation goes on, and a retry
# finds it compiled. At most GRAMMAR_QUEUE compilations wait or run at once (then 429).
GRAMMAR_TIMEOUT_S = 10.0
GRAMMAR_QUEUE = 8


@dataclass(slots=True, eq=False)
class ServerState:
    pipe: PagedPipeline
    info: Info
    limits: Limits
    metrics: ServerMetrics
    compute_type: str = "cpu"
    in_flight: int = 0  # sequences holding a slot
    # Every submitted request still alive (the engine holds running ones); shutdown waits on them.
    handles: weakref.WeakSet[Request] = field(default_factory=weakref.WeakSet)
    closing: bool = False
    requests_cancelled: bool = False  # set by cancel_requests: the drain is over, nothing more is submitted
    special_ids: frozenset[int] = frozenset()
    token_text: Any = None  # token id -> its string (set in __post_init__)
    workers: ThreadPoolExecutor | None = None
    # Constraints compile on a thread of their own: a slow one never holds up tokenizing (workers).
    grammar_worker: ThreadPoolExecutor | None = None
    compiling: int = 0  # constraints waiting for or in compilation
    # No token covers more characters than the longest vocabulary entry: a text longer than this many
    # characters per allowed token cannot fit, and is refused without being tokenized.
    max_token_chars: int = 0

    def __post_init__(self) -> None:
        tok = self.pipe.tokenizer
        self.special_ids = frozenset(getattr(tok, "all_special_ids", ()) or ())
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        self.max_token_chars = max(map(len, vocab), default=0) or 2**31
        # Per-token strings (logprobs, top tokens) are looked up over and over; the vocabulary is fixed.
        self.token_text = functools.lru_cache(maxsize=65536)(self._token_text)
        self.workers = ThreadPoolExecutor(self.info.validation_workers, thread_name_prefix="hf_paged-validation")
        self.grammar_worker = ThreadPoolExecutor(1, thread_name_prefix="hf_paged-grammar")

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel every request and wait until the engine delivered their last events: the engine
        thread must not post to this event loop once it is closed."""
        self.closing = True
        pending = self.cancel_requests()
        deadline = time.monotonic() + timeout
        while any(not h.done for h in pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.grammar_worker.shutdown(wait=False, cancel_futures=True)

    def cancel_requests(self) -> list[Request]:
        """Cancel every request still running (shutting down); returns them. Each consumer still listening
        then answers 503 (:class:`~hf_paged.server.generation.Generation`); one still being validated gets 503
        when it would be submitted."""
        self.requests_cancelled = True
        pending = [h for h in list(self.handles) if not h.done]
        for h in pending:
            h.cancel()
        return pending

    def track(self, handle: Request) -> None:
        """Hold ``handle`` for the shutdown; one that arrives after the drain ended is cancelled at once (its
        consumer then answers 503), whichever path started it (an API route, a UI chat)."""
        self.handles.add(handle)
        if self.requests_cancelled:
            handle.cancel()

    def healthy(self) -> bool:
        """False while shutting down or once the engine thread died (requests would hang forever)."""
        return not self.closing and self.pipe.alive

    def _token_text(self, token_id: int) -> str:
        return self.pipe.tokenizer.decode([token_id], skip_special_tokens=False)

    async def off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a validation worker (CPU-heavy work must not block the loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, functools.partial(fn, *args, **kwargs))

    async def compile_grammar(self, constraint: tuple[str, str]) -> None:
        """Compile a request's constraint (xgrammar) on the grammar worker, unless compiled lately: 422 for a
        bad one or one still compiling after GRAMMAR_TIMEOUT_S; 429 while GRAMMAR_QUEUE others wait, or
        when it timed out still queued behind them."""
        grammars = self.pipe.grammars
        if grammars.cached(constraint):
            return
        if self.compiling >= GRAMMAR_QUEUE:
            raise overloaded()
        job = self.grammar_worker.submit(grammars.compile, constraint)
        self.compiling += 1

        def done(f: asyncio.Future) -> None:  # on the event loop
            self.compiling -= 1
            if not f.cancelled():
                f.exception()  # retrieved: a late failure after a timeout is not an unhandled error
        fut = asyncio.wrap_future(job)
        fut.add_done_callback(done)
        try:
            await asyncio.wait_for(asyncio.shield(fut), GRAMMAR_TIMEOUT_S)
        except ValueError as exc:
            raise validation_error(str(exc)) from None
        except asyncio.TimeoutError:
            if job.cancel():  # never started: the others before it took the time
                raise overloaded() from None
            raise validation_error(f"{constraint[0]}: still compiling after {GRAMMAR_TIMEOUT_S:.0f} s; simplify "
                                   "it (fewer optional properties, alternatives or long repetitions)") from None

    # ------------------------------------------------------------------ admission (TGI: a semaphore)
    def acquire(self, sequences: int = 1) -> "Permit":
        """Slots for ``sequences`` sequences, or 429 when they are not free now (503 when closing,
        422 when the request could never fit)."""
        if self.closing:
            raise APIError(503, "Server is shutting down", "unhealthy")
        limit = self.info.max_concurrent_requests
        if sequences > limit:
            raise validation_error(f"the request runs {sequences} sequences; the server runs at most {limit} "
                                   "at once (max_concurrent_requests)")
        if self.in_flight + sequences > limit:
            raise overloaded()
        self.in_flight += sequences
        return Permit(self, sequences)


def state_of(request: "HTTPRequest") -> ServerState:
    """The app's state, from any request of the app."""
    return request.app.state.hf_paged


class Permit:
    """Slots held by one request; ``release()`` may be called from several cleanup paths, it counts once."""

    def __init__(self, state: ServerState, sequences: int) -> None:
        self._state: ServerState | None = state
        self.sequences = sequences

    def release(self) -> None:
        if self._state is not None:
            self._state.in_flight -= self.sequences
            self._state = None

    @contextmanager
    def held_until_handed_over(self) -> Iterator["Permit"]:
        """Releases the slots if anything in the block fails (whatever the error); on success the
        caller owns them and must release them (or hand them to an :class:`SSEResponse`)."""
        try:
            yield self
        except BaseException:
            self.release()
            raise
