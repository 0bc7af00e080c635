"""DecodeGraphs: decode steps replayed as CUDA graphs over static buffers.

A decode step (one new token per sequence) has the same shape for every step of the same batch size,
so its whole forward (HF modeling code, the paged attention kernels and the LM head) is captured once
per batch-size bucket and replayed: the host's work per step shrinks to filling six small buffers in
place and one ``replay()``. Batches are padded up to their bucket: padding rows have no query
(``cu_seqlens_q`` repeats), no context (``seq_len`` 0) and slot -1 (never written), and their logits
are dropped. Prefill and mixed steps, steps with LoRA adapter tokens and batches above the largest bucket
run eagerly; with LoRA layers in the model, the graphs run (and are captured as) the base model alone.

Nothing inside the captured forward may sync with the host or depend on a host value that changes
between steps: the attention call gets ``max_seqlen_k`` = the static table width, so the split-K grid
is fixed at capture and each program finds its real length on the device.

With ``capture=False`` the same buffers and padding run eagerly (on CPU too): that is how the
static-buffer logic is tested without a GPU. ``graph_api`` replaces torch.cuda's graphs: the tests pass
a recorder (``tests/graph_replay.py``) that captures the dispatcher's ops on CPU and replays them with
the capture's Python values baked in, as a CUDA graph does.

With ``compile=True`` (CPU, ``EngineConfig.compile``) the forward over the same buffers is compiled
by ``torch.compile`` (inductor) instead: HF's small ops (rotary embedding, activations, residual adds,
casts) become a few fused C++ loops and the per-module Python is gone, while the paged-attention,
linear and RMSNorm kernels stay opaque calls (their fake versions in :mod:`hf_paged.kernels.cpu` tell
the tracer their shapes). The batch dimension is dynamic, so a batch runs at its own size (no padding
to a bucket): batch 1 gets a graph, and 2..max_bs one per range between the batch sizes where the code
branches (a linear layer's row threshold). Every bucket size is run once at construction, which
compiles each range up front rather than in the middle of serving. A forward that fails to compile
later falls back to the eager one.

Example::

    graphs = DecodeGraphs(model, pool, max_bs=256, max_model_len=4096, capture=True)
    if graphs.fits(plan):
        logits = graphs.run(plan)     # [len(plan.ids), vocab] float32, a view of a static buffer
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from typing import Any

import numpy as np
import torch

from ..kv.metadata import PagedMetadata, StepTensors, TableRows, to_device
from ..kv.pool import KVPool

logger = logging.getLogger("hf_paged")


def bucket_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond; ``max_bs`` last."""
    sizes = [b for b in (1, 2, 4) if b < max_bs]
    b = 8
    while b < max_bs:
        sizes.append(b)
        b += 8 if b < 64 else 16 if b < 256 else 32
    return sizes + [max_bs]


class CudaGraphApi:
    """What :meth:`DecodeGraphs.capture` uses of torch.cuda (a stand-in may replace it in tests)."""

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def session(self, device: torch.device):
        """Warm-ups and captures on one side stream, as torch's CUDA-graph notes advise (the per-stream
        setup, such as cuBLAS's workspace, happens in a warm-up, not in a capture); afterwards the caller's
        stream is current again, also when a capture failed half-way, and waits for the side stream."""
        caller = torch.cuda.current_stream(device)
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            torch.cuda.set_stream(caller)
            caller.wait_stream(self.stream)

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def pool(self) -> object:
        return torch.cuda.graph_pool_handle()

    def new_graph(self) -> torch.cuda.CUDAGraph:
        return torch.cuda.CUDAGraph()

    def capturing(self, graph: torch.cuda.CUDAGraph, pool: object):
        # thread_local: another thread's work (a second pipeline, the caller's own) cannot void this capture
        return torch.cuda.graph(graph, pool=pool, stream=self.stream, capture_error_mode="thread_local")


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, pool: KVPool, *, max_bs: int, max_model_len: int,
                 device: torch.device, capture: bool = True, compile: bool = False,
                 graph_api: CudaGraphApi | None = None, adapters: Any = None) -> None:
        if max_bs < 1:
            raise ValueError(f"max_bs must be >= 1, got {max_bs}")
        if capture and compile:
            raise ValueError("compile=True compiles the eager static-buffer forward: it needs capture=False")
        self.model = model
        self.pool = pool
        self.device = device
        self.max_bs = max_bs
        self.buckets = bucket_sizes(max_bs)
        # Blocks per table row: no table holds more than the pool (a 10M-token context would otherwise size
        # the tables and their pinned staging in gigabytes).
        self.width = min(math.ceil(max_model_len / pool.block_size), pool.num_blocks)
        self.max_keys = self.width * pool.block_size
        head = model.get_output_embeddings()
        self.vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
        self._keep_kwarg = {"logits_to_keep": 0} if "logits_to_keep" in inspect.signature(
            type(model).forward).parameters else {}
        self.replays_by_bucket: dict[int, int] = {}  # bucket -> decode steps it served
        self.steps_served = 0  # their sum, read by other threads (EngineStats)
        self.api = graph_api or CudaGraphApi()
        self.adapters = adapters  # hf_paged.lora.AdapterSet: its layers run base-only in these forwards
        dev = device
        self.ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.slots = torch.full((max_bs,), -1, dtype=torch.long, device=dev)
        self.tables = torch.zeros(max_bs, self.width, dtype=torch.int32, device=dev)
        self.cu = torch.zeros(max_bs + 1, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        # The graphs' output buffer; a compiled forward returns fresh logits instead.
        self.logits = None if compile else torch.zeros(max_bs, self.vocab, dtype=torch.float32, device=dev)
        self.fill = torch.zeros(2, max_bs, dtype=torch.long, device=dev)  # async scheduling: dst, src rows
        self._pinned = dev.type == "cuda"
        # Host staging, filled with numpy and copied without waiting; two sets used in turn, so a step
        # can be filled while the previous step's copies may still be queued on the device.
        self._staging = [self._new_staging() for _ in range(2)]
        self._turn = 0
        # On CUDA, an event after each staging set's copies: a set is refilled two runs later, when its
        # copies have long left it if every step is completed before the next but one is planned (as the
        # Stepper does); the event makes sure of it for any caller.
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._rows = TableRows(width=self.width)  # block tables kept between steps, copied in by rows
        self._graphs: dict[int, Any] = {}  # bucket -> torch.cuda.CUDAGraph (or the api's stand-in)
        self.captured = False
        self._compiled = None
        if capture:
            self.capture()
        if compile:
            self.buckets = list(range(1, max_bs + 1))
            # Dynamo keeps compiled entries per code object (the model classes' forwards), shared by every
            # pipeline of the process; each pipeline adds its own (batch 1, batch 2..), so the default
            # limit of 8 would end compiling at the fourth pipeline of one process.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._compiled = torch.compile(model, fullgraph=True, dynamic=False)
            self._warm_up()

    @property
    def mode(self) -> str:
        """How its steps run: ``cuda_graphs``, ``compiled`` or ``static`` (the buffers, eagerly)."""
        return "cuda_graphs" if self.captured else "compiled" if self._compiled is not None else "static"

    @property
    def replays(self) -> int:
        """Decode steps run through the graphs (or the static buffers), all buckets."""
        return sum(self.replays_by_bucket.values())

    # ------------------------------------------------------------------ capture
    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket, largest first, all in one memory pool."""
        api = self.api
        if not api.supports(self.device):
            raise RuntimeError("CUDA graphs need a CUDA model; use capture=False to run the buffers eagerly")
        start = time.perf_counter()
        with api.session(self.device):
            self._fill_padding(0, self.max_bs)
            api.synchronize(self.device)
            mempool = api.pool()
            for b in reversed(self.buckets):
                self._forward(b)  # warm-up: Triton compiles and autotunes outside the capture
                api.synchronize(self.device)
                graph = api.new_graph()
                with api.capturing(graph, mempool):
                    self._forward(b)
                self._graphs[b] = graph
            api.synchronize(self.device)
        self.captured = True
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self._graphs), self.max_bs,
                    time.perf_counter() - start)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile (batch 1, then any batch) and run every bucket size once, on padding rows."""
        start = time.perf_counter()
        for b in bucket_sizes(self.max_bs):
            self._fill_padding(0, b)
            self._forward(b, compiled=True)
        logger.info("compiled the decode forward (batch 1..%d) in %.1f s", self.max_bs, time.perf_counter() - start)

    def _forward(self, b: int, compiled: bool = False) -> torch.Tensor:
        """The model (or its compiled version) on the first ``b`` rows of the buffers; float32 logits."""
        # [1, b] with strides (b, 1) for every b (a [None, :b] view's first stride is max_bs, equal to b only at
        # b == max_bs: the tracer would guard on that equality and compile again for every other size).
        ids, positions = self.ids[:b].view(1, b), self.positions[:b].view(1, b)
        host = StepTensors(self.slots[:b], self.tables[:b], self.cu[: b + 1], self.lens[:b], None)
        if compiled and b > 1:
            # One graph for the batches of 2 or more (a batch of 1 is specialised by the tracer anyway), or
            # one per range where the code branches on the batch size (a linear layer's row threshold):
            # "maybe" lets such a guard narrow the range instead of failing the compilation.
            for t, dim in ((ids, 1), (positions, 1), (host.slot_mapping, 0), (host.block_tables, 0),
                           (host.seq_lens, 0), (host.cu_seqlens_q, 0)):
                torch._dynamo.maybe_mark_dynamic(t, dim)
        meta = PagedMetadata(self.pool, host, 1, self.max_keys)
        meta._by_device[self.device] = host
        model = self._compiled if compiled else self.model
        with self._base_only():
            out = model(input_ids=ids, position_ids=positions, paged_metadata=meta, use_cache=False,
                        **self._keep_kwarg)
        if self.logits is None:
            return out.logits[0, :, : self.vocab].float()
        self.logits[:b].copy_(out.logits[0, :, : self.vocab])
        return self.logits[:b]

    def _base_only(self) -> Any:
        """PEFT's LoRA layers as the base model (an empty batch of the engine's batched LoRA): without it they
        would apply PEFT's active adapter to every row."""
        if self.adapters is None:
            return contextlib.nullcontext()
        from ..lora.layers import LoraBatch

        return self.adapters.active(LoraBatch([]))

    # ------------------------------------------------------------------ steps
    def fits(self, plan) -> bool:
        """A decode-only plan (one query per sequence, every row kept, no adapter token; with LoRA layers in the
        model, not through the compiled forward) of at most ``max_bs`` rows."""
        n = len(plan.q_lens)
        base = plan.lora_slots is None or (self._compiled is None and self.adapters is not None
                                           and all(s is None for s in plan.lora_slots))
        return (0 < n <= self.max_bs and len(plan.ids) == n and base
                and len(plan.keep) == n and plan.keep[-1] == n - 1 and plan.keep[0] == 0
                and all(len(t) <= self.width for t in plan.tables))

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} rows exceed the largest bucket {self.max_bs}")

    @torch.inference_mode()
    def run(self, plan, prev_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 logits ``[n, vocab]`` of a plan that :meth:`fits` (a view of a static buffer,
        valid until the next run). ``prev_ids``: the in-flight step's sampled ids, for ``plan.fill``."""
        n = len(plan.ids)
        b = self.bucket(n)
        turn = self._turn
        h_vec, h_cu, h_tables = self._staging[turn]
        self._turn ^= 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()
        vec = h_vec.numpy()
        vec[0, :n] = plan.ids
        vec[1, :n] = plan.positions
        vec[2, :n] = plan.slots
        vec[3, :n] = plan.seq_lens
        vec[0:2, n:b] = 0
        vec[2, n:b] = -1
        vec[3, n:b] = 0
        cu = h_cu.numpy()
        cu[: n + 1] = np.arange(n + 1)
        cu[n + 1 : b + 1] = n
        w = self._rows.pack_into(plan.tables, h_tables.numpy(), self.width)  # [n, w] at the front of h_tables
        nb = self._pinned
        self.ids[:b].copy_(h_vec[0, :b], non_blocking=nb)
        self.positions[:b].copy_(h_vec[1, :b], non_blocking=nb)
        self.slots[:b].copy_(h_vec[2, :b], non_blocking=nb)
        self.lens[:b].copy_(h_vec[3, :b], non_blocking=nb)
        self.cu[: b + 1].copy_(h_cu[: b + 1], non_blocking=nb)
        # Only the columns the tables use; those past w keep older entries, which are never read (past
        # every row's length).
        self.tables[:n, :w].copy_(h_tables[: n * w].view(n, w), non_blocking=nb)
        if plan.fill is not None:
            # Tokens sampled by the step still in flight go from its output into the input, on the device.
            m = len(plan.fill)
            vec[4, :m], vec[5, :m] = zip(*plan.fill)
            self.fill.copy_(h_vec[4:6], non_blocking=nb)
            prev = to_device(prev_ids, self.device)
            self.ids.index_copy_(0, self.fill[0, :m], prev.index_select(0, self.fill[1, :m]))
        if nb:
            self._copied[turn] = torch.cuda.Event()
            self._copied[turn].record(torch.cuda.current_stream(self.device))
        self.replays_by_bucket[b] = self.replays_by_bucket.get(b, 0) + 1
        self.steps_served += 1
        if self.captured:
            self._graphs[b].replay()
            return self.logits[:n]
        if self._compiled is not None:
            try:
                return self._forward(b, compiled=True)[:n]
            except Exception:  # noqa: BLE001 - a recompile the tracer cannot do: this step and later ones run eagerly
                logger.warning("hf_paged: the compiled decode forward failed; decode steps run eagerly from now on",
                               exc_info=True)
                self._compiled = None
        return self._forward(b)[:n]

    def _new_staging(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pin = self._pinned
        # ids, positions, slots, lens, and the async fill's destination and source rows
        return (torch.zeros(6, self.max_bs, dtype=torch.long, pin_memory=pin),
                torch.zeros(self.max_bs + 1, dtype=torch.int32, pin_memory=pin),
                torch.zeros(self.max_bs * self.width, dtype=torch.int32, pin_memory=pin))  # [n, w] rows, packed

    def _fill_padding(self, n: int, b: int) -> None:
        self.ids[n:b] = 0
        self.positions[n:b] = 0
        self.slots[n:b] = -1
        self.lens[n:b] = 0
        self.cu[n + 1 : b + 1] = n
