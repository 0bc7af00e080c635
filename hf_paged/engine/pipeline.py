"""PagedPipeline: continuous-batching generation on a background thread, for any number of callers.

Example::

    pipe = hf_paged.PagedPipeline(model, tokenizer, kv_memory="2GiB", max_num_seqs=128)
    results = pipe.generate(["Hi", [{"role": "user", "content": "Hello"}]], max_new_tokens=64)
    for event in pipe.stream("Tell me a story", max_new_tokens=200):
        print(event.text, end="", flush=True)
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import torch

from ..config import EngineConfig
from ..kv.pool import KVPool
from ..lora import AdapterSet
from ..wrap import base_model, is_peft, kv_pool, tp_size, wrap
from .delivery import Delivery
from .host_runtime import park_openmp_workers, release_openmp_pool, tune_malloc
from .engine import Engine
from .stepping import Stepper
from .grammar import Grammars
from .outputs import RequestOutput, StreamEvent
from .params import SamplingParams, merged_config
from .request import Request, encode_prompt
from .stats import EngineStats
from .tp import StepChannel, TensorParallelError, init_group

logger = logging.getLogger(__name__)

Prompt = str | list[dict] | list[int]


class PagedPipeline:
    """Continuous batching on a background thread (see the module docstring).

    Engine options come as an :class:`~hf_paged.config.EngineConfig` (``config=``) and/or as its
    field names (``kv_memory="2GiB", max_num_seqs=64``), which override the config's values.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, config: EngineConfig | None = None,
                 **options: Any) -> None:
        if tokenizer is None:
            raise ValueError("tokenizer is required")
        self.config = config = EngineConfig.from_kwargs(config, **options)
        wrap(model, config=config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pool: KVPool = kv_pool(model)
        # Tensor parallel (a model loaded with tp_plan="auto"): rank 0 leads, the others follow its steps.
        self.tp: StepChannel | None = None
        if tp_size(model) > 1:
            if config.lora_adapters or is_peft(model):
                raise ValueError("LoRA adapters are not supported under tensor parallelism yet")
            self.tp = StepChannel(config.tp_timeout_s)
            blocks = self.tp.agree_min(self.pool.num_blocks)  # the leader's block ids must exist everywhere
            if blocks != self.pool.num_blocks:
                wrap(model, config=replace(config, kv_memory=None, num_blocks=blocks))
                self.pool = kv_pool(model)
        ctx = getattr(model.config, "max_position_embeddings", None) or 2**31
        self.max_model_len = min(config.max_model_len or ctx, ctx)
        # LoRA adapters: a PeftModel's own, those of config.lora_adapters, and any loaded later; the
        # batched LoRA layers run each request's adapter (None: the base model) in one step.
        self.adapters = AdapterSet(model, max_rank=config.max_lora_rank)
        for name, path in (config.lora_adapters or {}).items():
            self.adapters.load(name, path)
        # The base transformers model runs the steps (the LoRA layers are inside it).
        self.engine = Engine(base_model(model), self.pool, max_num_seqs=config.max_num_seqs,
                             max_batch_tokens=config.max_batch_tokens, max_model_len=self.max_model_len,
                             adapters=self.adapters)
        if self.tp is not None and self.tp.leader:
            self.engine.runner.broadcast = self.tp
        self._cpu = self.engine.runner.device.type == "cpu"
        if self._cpu:
            tune_malloc()  # per-step tensors reuse heap memory instead of mmap/munmap each step
            release_openmp_pool()  # this thread's idle OpenMP team would slow the engine thread's
        self.engine.runner.choose_decode_path(config, self.max_model_len, tp=self.tp is not None)
        self.delivery = Delivery(self.engine, tokenizer)  # used by the background thread only
        self.grammars = Grammars(tokenizer, model.config.vocab_size)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._held: tuple[str, Any] | None = None  # an inbox item taken out but not applied yet (_drain)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()  # also orders _put against the loop's last drain
        self._inbox_closed = self._closed = False
        self._broken: str | None = None  # why the engine cannot go on (a tensor-parallel rank died)
        self._leading = False  # lead(): the other ranks follow() for good

    @property
    def follower(self) -> bool:
        """True on a tensor-parallel rank other than 0: it runs rank 0's steps (:meth:`follow`)."""
        return self.tp is not None and not self.tp.leader

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype | str | None = None, device: str | None = None,
                        device_map: Any = None, tp_plan: str | None = None, **kwargs) -> "PagedPipeline":
        """Load a local model folder (or ``"default"``) and build a pipeline on it; ``tp_plan="auto"``
        shards it over the torch.distributed ranks (run every rank, e.g. under torchrun)."""
        from ..models import load_model

        if tp_plan is not None:
            # Join the group before transformers does (with torch's 30-minute default timeout).
            options = {k: v for k, v in kwargs.items() if k != "config"}
            init_group(EngineConfig.from_kwargs(kwargs.get("config"), **options).tp_timeout_s)
        model, tok = load_model(path, dtype=dtype, device=device, device_map=device_map, tp_plan=tp_plan)
        return cls(model, tok, **kwargs)

    # ------------------------------------------------------------------ submission
    def encode(self, prompt: Prompt, *, tools: list[dict] | None = None, continue_final_message: bool = False
               ) -> list[int]:
        """Token ids of a string, a chat message list (chat template applied, with ``tools`` where given; with
        ``continue_final_message`` its last message is left open, to be continued) or a token id list."""
        return encode_prompt(self.tokenizer, self.model.config.vocab_size, prompt, tools, continue_final_message)

    def _make_request(self, prompt: Prompt, kwargs: dict) -> Request:
        kwargs = dict(kwargs)  # generate() shares one dict between its prompts
        adapter = self.adapters.get(kwargs.pop("adapter", None))  # ValueError naming the loaded ones
        ids = self.encode(prompt, continue_final_message=kwargs.pop("continue_final_message", None) or False)
        config = merged_config(self.model.generation_config, kwargs.pop("generation_config", None))
        params = SamplingParams.from_request(config, prompt_length=len(ids), **kwargs)
        total = len(ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"max_new_tokens: prompt ({len(ids)} tokens) + max_new_tokens "
                             f"({params.max_new_tokens}) = {total} exceeds the model's context of "
                             f"{self.max_model_len} tokens")
        blocks = -(-total // self.pool.block_size)
        if blocks > self.pool.num_blocks:
            raise ValueError(f"max_new_tokens: a sequence of {total} tokens needs {blocks} KV blocks but the "
                             f"pool has {self.pool.num_blocks}; raise kv_memory/num_blocks or lower max_new_tokens")
        req = Request(f"req-{next(self._ids)}", prompt, ids, params, self._cancel)
        req.adapter = adapter
        if params.constraint is not None:
            req.grammar = self.grammars.compile(params.constraint)  # ValueError with xgrammar's reason
        return req

    def submit(self, prompt: Prompt, **kwargs) -> Request:
        """Queue one prompt; returns its handle at once. Raises ValueError on invalid input."""
        return self._enqueue([self._make_request(prompt, kwargs)])[0]

    def _enqueue(self, reqs: list[Request]) -> list[Request]:
        self._put([("add", r) for r in reqs])
        return reqs

    def generate(self, prompts: Prompt | Sequence[Prompt], *, progress: bool | None = None,
                 **kwargs) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt or a list; results in order. Every prompt is validated first."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict)))
        batch = [prompts] if single else list(prompts)
        made = [self._make_request(p, kwargs) for p in batch]  # every rank validates alike
        for r in made:
            r.quiet = True  # only results are read here
        if self.follower:  # run rank 0's steps until it sends the results
            results = self._follow(until_results=True)
            return results[0] if single else results
        if self._cpu:
            release_openmp_pool()  # this thread only waits now; its idle OpenMP team would slow the engine
        reqs = self._enqueue(made)
        show = len(reqs) > 1 if progress is None else progress
        results = []
        try:
            from tqdm.auto import tqdm

            for r in tqdm(reqs, desc="generate", unit="req", disable=not show):
                results.append(r.result())
        except BaseException as exc:
            for r in reqs:
                r.cancel()
            if self.tp is not None and self._broken is None:
                self.tp.send("error", f"{type(exc).__name__}: {exc}")
            raise
        if self.tp is not None:
            self.tp.send("results", results)
        return results[0] if single else results

    def follow(self) -> None:
        """On a tensor-parallel follower rank: run rank 0's steps until rank 0 closes its pipeline (a
        server's other ranks call this; :mod:`hf_paged.engine.tp`). Raises TensorParallelError when the
        group breaks."""
        if not self.follower:
            raise RuntimeError("follow() is for tensor-parallel ranks other than 0")
        self._follow(until_results=False)

    def lead(self) -> None:
        """Tensor-parallel rank 0 of a server, whose other ranks :meth:`follow`: the engine starts, and sends them a
        heartbeat while idle (they wait beyond ``tp_timeout_s``; a rank that died is found at once)."""
        if self.tp is None or self.follower:
            raise RuntimeError("lead() is for rank 0 of a tensor-parallel pipeline")
        self._leading = True
        self._put([])

    def _follow(self, *, until_results: bool) -> Any:
        while True:
            kind, payload = self.tp.recv()
            if kind == "step":
                try:
                    self.engine.runner.execute(payload)
                except Exception as exc:  # rank 0 and the others are inside this step's collectives
                    raise TensorParallelError(f"a step failed on tensor-parallel rank {self.tp.rank}, so the "
                                              f"group is out of step: {type(exc).__name__}: {exc}") from exc
            elif kind == "results" and until_results:
                return payload
            elif kind == "error" and until_results:
                raise RuntimeError(f"generation failed on rank 0: {payload}")
            elif kind == "stop":
                self._closed = True
                if until_results:
                    raise TensorParallelError("rank 0 closed its pipeline before sending the results")
                return

    def stream(self, prompt: Prompt, **kwargs) -> Iterator[StreamEvent]:
        """Events as tokens come; leaving the loop early cancels the request."""
        yield from self.submit(prompt, **kwargs)

    async def astream(self, prompt: Prompt, **kwargs) -> AsyncIterator[StreamEvent]:
        """``async for`` version of :meth:`stream`; cancelling the task cancels the request."""
        async for ev in self.submit(prompt, **kwargs):
            yield ev

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters requests can name (``adapter="name"``)."""
        return self.adapters.names

    def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT LoRA adapter folder ``path`` as ``name``, while serving: it is loaded between
        two engine steps. Raises ValueError (bad folder, rank above ``max_lora_rank``, name taken...)."""
        if self.tp is not None:
            raise ValueError("LoRA adapters are not supported under tensor parallelism yet")
        self._call(self.adapters.load, name, path)

    def unload_adapter(self, name: str) -> None:
        """Unload adapter ``name``; refused (ValueError) while sequences run or wait on it."""
        def unload() -> None:
            if in_use := self.engine.sequences_of(self.adapters.get(name)):
                raise ValueError(f"adapter {name!r} is in use by {in_use} running or waiting sequences; "
                                 "cancel them or wait for them to finish")
            self.adapters.unload(name)

        self._call(unload)

    def _call(self, fn, *args) -> Any:
        """Run ``fn(*args)`` on the engine thread between two steps; returns its result or raises."""
        fut: Future = Future()
        self._put([("call", (fn, args, fut))])
        return fut.result()

    def stats(self) -> EngineStats:
        """Engine counters now (attributes, or ``stats()["blocks_used"]``; ``.as_dict()`` for JSON)."""
        return self.engine.stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, between two steps. A parameter replaced or edited in place resets it by
        itself (seen by a request that finds the engine idle); after edits through ``.data``, or while serving,
        call this."""
        self._call(self.pool.allocator.reset_prefix_cache)

    # ------------------------------------------------------------------ background loop
    def _cancel(self, req: Request) -> None:
        self._inbox.put(("cancel", req))

    def _put(self, items: list[tuple[str, Any]]) -> None:
        """Queue adds or calls (starting the loop); refused once the pipeline is closed or broken, and once
        the loop took its last items (under the same lock): nothing queued is left unanswered."""
        if self.follower:  # its engine runs rank 0's steps only
            raise RuntimeError("a tensor-parallel follower rank: call generate() as rank 0 does, or follow()")
        with self._start_lock:
            if self._closed or self._broken is not None or self._inbox_closed:
                raise RuntimeError(f"pipeline is broken: {self._broken}" if self._broken else "pipeline is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="hf_paged-engine", daemon=True)
                self._thread.start()
            for item in items:
                self._inbox.put(item)

    def _take(self, block: bool) -> tuple[str, Any]:
        item, self._held = self._held, None
        if item is not None:
            return item
        if block and self._leading:
            return self.tp.get_with_heartbeat(self._inbox)
        return self._inbox.get(block=block)

    def _drain(self, block: bool, stepper: Stepper) -> bool:
        """Apply queued adds/cancels/calls, each after every token launched so far is delivered (a cancel
        must not land between a step's recording and its delivery); returns False when asked to stop."""
        while True:
            try:
                item = self._take(block)
            except queue.Empty:
                return True
            block = False
            if stepper.holding:  # a stop too: the loop's handler then covers a flush that raises
                self._held = item  # if delivering fails, the loop fails what runs and applies this item next
                stepper.flush()
                self._held = None
            kind, req = item
            if kind == "stop":
                return False
            if kind == "call":
                fn, args, fut = req
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # the caller gets it; the engine goes on
                    fut.set_exception(exc)
                continue
            if kind == "add":  # even if cancelled already: the cancel queued behind it ends it, with a result
                try:
                    self.delivery.add(req)
                except Exception as exc:  # this request alone is bad: tell its caller, keep serving
                    logger.exception("could not start request %s", req.request_id)
                    self.delivery.fail(req, f"{type(exc).__name__}: {exc}")
            elif kind == "cancel" and req.request_id in self.delivery.requests:
                self.delivery.cancel(req)

    def _loop(self) -> None:
        cuda = self.engine.runner.device.type == "cuda"
        if cuda:  # the current device is per thread, and Triton launches on it (and its stream)
            torch.cuda.set_device(self.engine.runner.device)  # a parameter's device: it has an index
        ahead = self.config.async_scheduling
        overlap = self.config.overlap
        stepper = Stepper(self.engine, self.delivery, overlap=cuda if overlap is None else overlap,
                          ahead=(cuda and self.tp is None) if ahead is None else ahead,
                          park=park_openmp_workers if self._cpu else None)
        while True:
            try:
                if stepper.holding and not self.engine.has_work():
                    stepper.flush()  # before idling (and _drain flushes before adds, cancels and calls)
                if not self._drain(not self.engine.has_work(), stepper):
                    break
                stepper.step()
            except TensorParallelError as exc:  # the group is gone: nothing can run any more
                logger.error("hf_paged: %s; the engine stops", exc)
                self._broken = str(exc)
                self.delivery.fail_all(str(exc))
                break
            except Exception as exc:  # one bad batch must not take the server down, nor fail what waits
                logger.exception("engine step failed")
                stepper.fail(f"{type(exc).__name__}: {exc}", everyone=False)
            except BaseException as exc:  # SystemExit and such end the thread: every request ends first
                logger.critical("hf_paged: the engine thread ends", exc_info=True)
                self._broken = f"the engine thread ended: {type(exc).__name__}: {exc}"
                stepper.fail(self._broken)
                break
        try:
            stepper.flush()  # what a tensor-parallel failure left held (a stop flushes in _drain)
        except Exception as exc:  # noqa: BLE001 - the requests must still end, and the queue be answered
            stepper.fail(f"{type(exc).__name__}: {exc}")
        self.delivery.cancel_all()
        with self._start_lock:  # from here _put refuses: nothing gets queued after the drain below
            self._inbox_closed = True
        while True:  # calls and adds queued behind the stop would otherwise wait forever
            try:
                kind, item = self._take(False)
            except queue.Empty:
                break
            if kind == "call":
                item[2].set_exception(RuntimeError("pipeline is closed"))
            elif kind == "add":
                self.delivery.fail(item, self._broken or "pipeline is closed")

    @property
    def alive(self) -> bool:
        """False once the background thread has stopped (closed, or died) or the pipeline is broken."""
        return not self._closed and self._broken is None and (self._thread is None or self._thread.is_alive())

    def close(self) -> None:
        """Cancel what is running and stop the background thread. Under tensor parallelism every rank
        calls it: rank 0 tells the others to stop, and they run its remaining steps until then."""
        if self._closed:
            return
        if self.follower and self._broken is None:
            try:
                self._follow(until_results=False)
            except TensorParallelError as exc:
                logger.warning("hf_paged: rank %d closing without rank 0's stop: %s", self.tp.rank, exc)
        self._closed = True
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join(timeout=30)
        if self.tp is not None and self.tp.leader and self._broken is None:
            try:
                self.tp.send("stop")  # the followers' follow() returns
            except TensorParallelError as exc:
                logger.warning("hf_paged: could not tell the other ranks to stop: %s", exc)

    def __enter__(self) -> "PagedPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
