"""Request: a submitted prompt and the handle its submitter holds (events, result, cancel)."""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from .outputs import RequestOutput, StreamEvent
from .params import SamplingParams, lone_surrogate


class Request:
    """Handle of a submitted request. Thread-safe; iterate it for events or call :meth:`result`.

    Example::

        handle = pipe.submit("Hello", max_new_tokens=16)
        for event in handle: print(event.text, end="")
        handle.cancel()   # at any time; its blocks are freed within one engine step
    """

    def __init__(self, request_id: str, prompt: Any, prompt_ids: list[int], params: SamplingParams,
                 canceller: Callable[["Request"], None]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.grammar: Any = None  # the compiled constraint of params, if any (set by the pipeline)
        self.adapter: Any = None  # the hf_paged.lora.Adapter it runs, None for the base model
        self._canceller = canceller
        self._events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self._async: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._output: RequestOutput | None = None
        self.cancelled = False
        self._reader = False  # a thread consumer took the events (they are read once: a second one would wait)
        # Only the last event is kept (generate()'s requests, which nobody iterates): a long batch job would
        # otherwise hold every token's event until its request ends (memory, and full GC passes over them).
        self.quiet = False

    # ------------------------------------------------------------------ delivery side
    def emit(self, event: StreamEvent, wakeups: "Wakeups | None" = None) -> None:
        """Hand ``event`` to every consumer. ``wakeups``: collect the asyncio consumers' puts there
        (sent with :meth:`Wakeups.send`, one wake-up per event loop) instead of waking each loop now."""
        if self.quiet and not event.finished:
            return
        with self._lock:
            # Done before delivery: a consumer that sees the last event must also see done=True.
            if event.finished:
                self._output = event.output
                self._done.set()
            if not self._async:
                # Held for a thread consumer (or the first asyncio one, which takes what is queued when it
                # attaches). Once an asyncio consumer is attached, events go to it alone: queued here as
                # well, nobody would read them, and a long stream would hold all its events to the end.
                self._events.put(event)
            for loop, q in self._async:
                if wakeups is not None:
                    wakeups.add(loop, q, event)
                    continue
                try:
                    loop.call_soon_threadsafe(q.put_nowait, event)
                except RuntimeError:  # that consumer's event loop is closed: nobody to deliver to
                    pass

    # ------------------------------------------------------------------ user side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the result keeps what was generated, with finish_reason "cancelled"."""
        if not self._done.is_set():
            self.cancelled = True
            self._canceller(self)

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        out = self._output
        if out is not None and out.error is not None:
            raise RuntimeError(f"request {self.request_id} failed: {out.error}")
        return out

    def __iter__(self) -> Iterator[StreamEvent]:
        with self._lock:
            if self._reader or self._async:  # events go to the asyncio consumers once one is attached
                raise RuntimeError(f"request {self.request_id}: its events are being read or were read already "
                                   "(one consumer reads them, once); result() gives the output")
            self._reader = True
        try:
            while True:
                ev = self._events.get()
                yield ev
                if ev.finished:
                    return
        finally:
            if not self._done.is_set():  # the consumer went away: stop the work
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[StreamEvent] = asyncio.Queue()
        with self._lock:
            if self._reader:
                raise RuntimeError(f"request {self.request_id}: a thread reads its events; result() gives the output")
            # Events emitted before we attached are in the thread queue; move them over first.
            while True:
                try:
                    q.put_nowait(self._events.get_nowait())
                except queue.Empty:
                    break
            if q.empty() and self._done.is_set():
                raise RuntimeError(f"request {self.request_id}: its events were read already; result() gives "
                                   "the output")
            self._async.append((loop, q))
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.finished:
                    return
        finally:
            if not self._done.is_set():
                self.cancel()


class Wakeups:
    """Events for asyncio consumers, grouped by event loop, so that a step's tokens for hundreds of
    streams wake each loop once: every ``call_soon_threadsafe`` writes to the loop's self-pipe (a system
    call on this thread, a wake-up and a callback on the loop's): 1.5 ms of this thread's time per step of
    256 events here, 0.13 ms batched (``benchmarks/delivery_micro.py``).
    Order is kept per consumer; :meth:`send` hands everything over and empties the collection."""

    __slots__ = ("_by_loop",)

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StreamEvent]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue, event: StreamEvent) -> None:
        items = self._by_loop.get(loop)
        if items is None:
            items = self._by_loop[loop] = []
        items.append((q, event))

    def send(self) -> None:
        by_loop, self._by_loop = self._by_loop, {}
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody to deliver to
                pass


def _put_all(items: list[tuple[asyncio.Queue, StreamEvent]]) -> None:
    for q, event in items:
        q.put_nowait(event)


def encode_prompt(tokenizer, vocab_size: int, prompt: Any, tools: list[dict] | None = None,
                  continue_final_message: bool = False) -> list[int]:
    """Token ids of a string, a chat message list (chat template applied, with ``tools`` where given; with
    ``continue_final_message`` the last message stays open, to be continued, instead of a new assistant turn
    being opened) or a token id list; ValueError naming what is wrong with it."""
    if lone_surrogate(prompt) is not None:
        raise ValueError("prompt: contains a lone UTF-16 surrogate, which is not valid Unicode text")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt: must not be empty")
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids:
            raise ValueError("prompt: encodes to no tokens")
        return ids
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt: token ids {bad[:5]} are outside the vocabulary")
        return list(prompt)
    if not isinstance(continue_final_message, bool):
        raise ValueError(f"continue_final_message must be true or false, got {continue_final_message!r}")
    if continue_final_message and not (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[-1], dict)):
        raise ValueError("continue_final_message: applies to a list of chat messages only")
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("prompt: chat messages need a tokenizer with a chat template")
        extra = {"tools": tools} if tools else {}
        if continue_final_message:
            extra["continue_final_message"] = True
        try:  # a template may refuse the messages (jinja errors: roles that must alternate, a missing field)
            ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=not continue_final_message,
                                                tokenize=True, **extra)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"messages: the chat template failed: {type(exc).__name__}: {exc}") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if not len(ids):
            raise ValueError("prompt: the chat template rendered no tokens")
        return list(ids)
    raise ValueError("prompt: must be a non-empty string, a list of chat messages or a list of token ids")
