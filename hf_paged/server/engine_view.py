"""A read-only view of the running engine: stats, the per-block state of the KV pool, and an in-process
client with the same surface as the demo's HTTP client (so the UI mounted on this server needs no
loop-back HTTP and no API key).

Blocks are counted one way everywhere (stats, metrics, this grid): used (referenced) + cached
(unreferenced, holding a prefix, evicted on demand) + free (holding nothing) = total.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ..engine.grammar import normalize as normalize_constraint
from ..engine.pipeline import PagedPipeline
from ..engine.request import Request
from .errors import APIError
from .generation import check_text_length



def blocks_payload(pipe: PagedPipeline) -> dict[str, Any]:
    """``GET /engine/blocks``: one state per block, 0 free, 1 used, 2 cached."""
    snap = pipe.pool.allocator.snapshot()
    return {"block_size": pipe.pool.block_size, "num_blocks": snap.total, "states": snap.states,
            "counts": {"free": snap.free, "used": snap.used, "cached": snap.cached}}


def stats_payload(pipe: PagedPipeline, *, model_id: str, in_flight: int, max_concurrent_requests: int) -> dict:
    """``GET /engine/stats``: ``pipe.stats()`` plus what a dashboard needs to label it."""
    return {**pipe.stats().as_dict(), "model_id": model_id, "block_size": pipe.pool.block_size,
            "http_in_flight": in_flight, "max_concurrent_requests": max_concurrent_requests,
            "engine": "hf_paged"}


class LocalEngineClient:
    """The demo UI's client surface, served straight from a pipeline in this process."""

    def __init__(self, pipe: PagedPipeline, model_id: str, state: Any = None) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self._state = state  # ServerState, for the in-flight count shown in the stats
        self.label = "in-process engine"

    async def chat(self, messages: list[dict], *, temperature: float, top_p: float, max_new_tokens: int,
                   seed: int | None, json_schema: dict | None = None, adapter: str | None = None) -> AsyncIterator[str]:
        """Text deltas of the reply (JSON following ``json_schema`` when given, from LoRA ``adapter`` when
        given); cancelling the consumer cancels the request. In a server (``state``) a chat is admitted as an
        API request is: a concurrency slot (429 when none is free), the prompt within ``max_input_tokens``, the
        schema compiled on the grammar worker (its queue and time limit); refusals raise RuntimeError."""
        state = self._state
        if state is None:
            async for text in self._chat(messages, temperature, top_p, max_new_tokens, seed, json_schema, adapter):
                yield text
            return
        try:
            check_text_length(state, messages)  # a huge pasted text is refused before it is tokenized
            permit = state.acquire(1)
        except APIError as exc:
            raise RuntimeError(exc.message) from None
        try:
            if json_schema is not None:
                try:
                    await state.compile_grammar(normalize_constraint("json_schema", json_schema))
                except (APIError, ValueError) as exc:
                    raise RuntimeError(getattr(exc, "message", str(exc))) from None
            async for text in self._chat(messages, temperature, top_p, max_new_tokens, seed, json_schema, adapter,
                                         max_input=state.limits.max_input_tokens):
                yield text
        finally:
            permit.release()

    async def _chat(self, messages: list[dict], temperature: float, top_p: float, max_new_tokens: int,
                    seed: int | None, json_schema: dict | None, adapter: str | None,
                    max_input: int | None = None) -> AsyncIterator[str]:
        def start() -> Request:
            ids = self.pipe.encode(messages)
            if max_input is not None and len(ids) > max_input:
                raise RuntimeError(f"the conversation has {len(ids)} tokens; this server takes at most {max_input} "
                                   "(max_input_tokens): start a new chat")
            pool = self.pipe.pool  # one sequence can outgrow neither the context nor the whole KV pool
            room = min(self.pipe.max_model_len, pool.num_blocks * pool.block_size) - len(ids)
            return self.pipe.submit(ids, max_new_tokens=max(1, min(max_new_tokens, room)),
                                    do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p,
                                    top_k=0, seed=seed, json_schema=json_schema, adapter=adapter)

        # Templating, tokenizing and compiling the schema are CPU work: off the event loop, which serves the API.
        starting = asyncio.get_running_loop().run_in_executor(None, start)
        try:
            handle = await asyncio.shield(starting)
        except asyncio.CancelledError:  # the consumer left while it started: cancel it once it has
            starting.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().cancel())
            raise
        if self._state is not None:
            self._state.track(handle)  # so that shutdown cancels UI chats too
        async for ev in handle:
            if ev.error is not None:
                raise RuntimeError(ev.error)
            if ev.text:
                yield ev.text

    async def adapters(self) -> list[str]:
        return self.pipe.adapter_names

    async def stats(self) -> dict | None:
        s = self._state
        return stats_payload(self.pipe, model_id=self.model_id, in_flight=s.in_flight if s else 0,
                             max_concurrent_requests=s.info.max_concurrent_requests if s else 0)

    async def blocks(self) -> dict | None:
        return blocks_payload(self.pipe)
