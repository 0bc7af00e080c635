"""Runner: turns a Schedule into one flat forward of the HF model and returns next-token logits
(``plan``: the schedule as a :class:`StepPlan` of plain lists; ``execute``: the forward).

All scheduled tokens are packed into a single row ``[1, T]`` with per-token ``position_ids``; the
attention layers find each sequence's K/V through the ``paged_metadata`` kwarg. Only the rows whose
logits are needed (the last token of each sequence that samples) go through the LM head.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..kv.metadata import PagedMetadata, TableRows, host_tensor, to_device
from ..lora.layers import LoraBatch
from ..kv.pool import KVPool
from .scheduler import Schedule
from .tp import TensorParallelError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepPlan:
    """One forward, as plain lists: what the runner feeds the model. Under tensor parallelism rank 0
    broadcasts it and every rank executes it (:mod:`hf_paged.engine.tp`)."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    tables: list[list[int]]
    q_lens: list[int]
    seq_lens: list[int]
    keep: list[int]  # rows whose logits are returned, in schedule order
    copies: list[tuple[int, int]]  # copy-on-write block copies to do first
    lora_slots: list[int | None] | None = None  # adapter slot of each packed sequence
    # Async scheduling: (position in ids, row of the previous step's sampled ids) of each input token
    # that was still being sampled when this step was planned (its place in ids holds 0 until then).
    fill: list[tuple[int, int]] | None = None
    # The kept rows (positions in keep) that are plain greedy picks, and whether one of them wants its
    # logprob: the runner may then return a Picked from the fused LM head instead of the logits.
    pick: list[int] | None = None
    pick_logprob: bool = False


@dataclass(slots=True)
class Picked:
    """What :meth:`Runner.execute` returns for a ``pick`` plan through the fused LM head: the greedy token of
    each picked row and, with ``pick_logprob``, its log-probability (NaN where the row's maximum is not
    finite); the float32 logits of the other kept rows."""

    ids: torch.Tensor  # [len(rows)] int64
    logprobs: torch.Tensor | None  # [len(rows)] float32
    rows: list[int]  # the kept rows picked (StepPlan.pick)
    logits: torch.Tensor | None = None  # [len(rest), vocab]
    rest: list[int] | None = None  # the other kept rows, in keep order


# The fused LM head (kernels/cpu.head_argmax): on CPU, the greedy rows' output layer and argmax in one pass
# over the vocabulary, without their [rows, vocab] logits (docs/benchmarks.md, fifteenth session). From this
# many greedy rows (below it the logits were as cheap or cheaper) and up to this hidden size (at 960 the
# logits through oneDNN were faster up to 128 rows; at 576 the fused head was as fast or slightly faster from
# 16 rows, 1.3x at 256; 768 itself was not measured). HF_PAGED_FUSED_HEAD=0 turns it off.
FUSED_HEAD_MIN_ROWS = 16
FUSED_HEAD_MAX_HIDDEN = 768
# Model classes whose logits are exactly ``output_embeddings(base_model(...)[0])`` (no scaling, soft-capping
# or bias terms besides the layer's own); test_fused_head checks each against the model's forward.
_PLAIN_HEADS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                          "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                          "GPT2LMHeadModel", "OPTForCausalLM", "GPTNeoXForCausalLM"})


def fused_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear, int] | None:
    """(base model, output layer, vocabulary size) where the fused greedy head applies to ``model``:
    a CPU fp32 model of a class in ``_PLAIN_HEADS`` without final logit soft-capping, whose output layer
    is a plain ``nn.Linear`` of at most ``FUSED_HEAD_MAX_HIDDEN`` inputs, with the C++ kernels built."""
    if os.environ.get("HF_PAGED_FUSED_HEAD", "1").strip() == "0" or type(model).__name__ not in _PLAIN_HEADS \
            or not type(model).__module__.startswith("transformers.models."):  # not remote code of the same name
        return None
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) is not None:
        return None
    head = model.get_output_embeddings()
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    w = getattr(head, "weight", None)
    if type(head) is not torch.nn.Linear or not isinstance(base, torch.nn.Module) \
            or type(w) is not torch.nn.Parameter or w.device.type != "cpu" or w.dtype != torch.float32 \
            or head.in_features > FUSED_HEAD_MAX_HIDDEN:
        return None
    from ..kernels import cpu

    if not cpu.available():
        return None
    vocab = min(int(getattr(cfg, "vocab_size", None) or w.shape[0]), w.shape[0])
    return base, head, vocab


def _data_ptr(p: torch.Tensor) -> int:
    try:
        return p.data_ptr()
    except RuntimeError:  # a tensor subclass without storage of its own (a DTensor)
        return 0


def _version(p: torch.Tensor) -> int:
    try:
        return p._version
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) keeps no version counter
        return -1


class Runner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, adapters: Any = None) -> None:
        self.model = model
        self.pool = pool
        self.adapters = adapters  # hf_paged.lora.AdapterSet, or None
        self.broadcast: Any = None  # tensor parallel: a tp.StepChannel that sends each plan first
        self.device = model.get_input_embeddings().weight.device
        if hasattr(model.get_input_embeddings().weight, "to_local"):  # a DTensor under tensor parallelism
            self.device = model.get_input_embeddings().weight.to_local().device
        params = inspect.signature(type(model).forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self.graphs: Any = None  # a graphs.DecodeGraphs once use_graphs() ran
        self.head = fused_head(model)  # (base, output layer, vocab) for the fused greedy head, or None
        self._rows = TableRows()  # the running sequences' block tables, kept between steps
        self._weights = self._weights_key()

    def _weights_key(self) -> tuple[int, int]:
        """(where the base model's parameters are, what every parameter holds): the first changes when one of
        the base model's parameters is replaced (LoRA adapters come and go without it)."""
        named = list(self.model.named_parameters())
        where = hash(tuple((name, _data_ptr(p)) for name, p in named if "lora_" not in name))
        return where, hash(tuple((id(p), _version(p)) for _, p in named))

    def weights_changed(self) -> bool:
        """Whether a parameter was replaced or edited in place (an optimizer step, ``load_state_dict``) since the
        last call: K/V cached under the old weights must not serve new requests. Edits through ``.data`` leave
        no trace (``PagedPipeline.reset_prefix_cache()`` is for those). A few hundred microseconds for a model
        of 300 parameters: the engine asks only when a request finds it idle."""
        key = self._weights_key()
        changed, moved, self._weights = key != self._weights, key[0] != self._weights[0], key
        if moved and self.graphs is not None and self.graphs.captured:
            # The captured graphs read the old parameters' memory: from here on decode steps run eagerly.
            logger.warning("hf_paged: parameters were replaced (not edited in place); the decode CUDA graphs read "
                           "the old ones, so decode steps run eagerly now (a new pipeline captures them again)")
            self.graphs = None
        return changed

    def choose_decode_path(self, config: Any, max_model_len: int, *, tp: bool) -> None:
        """Decode steps as CUDA graphs on CUDA (not with ``enforce_eager``; tensor-parallel and multi-device
        models stay eager: their collectives and cross-device copies are not captured), or through
        torch.compile on CPU with ``config.compile``. A model that cannot be captured or compiled still
        serves, eagerly, with a warning (``EngineStats.decode_path`` then says ``eager``)."""
        one_device = len({p.device for p in self.model.parameters()}) == 1
        if config.compile:
            if self.device.type != "cpu" or tp or not one_device:
                raise ValueError("compile=True is for a model on one CPU device (on CUDA, decode steps run as "
                                 "CUDA graphs; tensor-parallel and multi-device models run eagerly)")
            try:
                self.use_graphs(min(config.max_num_seqs, 512), max_model_len, capture=False, compile=True)
            except Exception:  # a model torch.compile cannot trace still serves, eagerly
                logger.warning("hf_paged: compiling the decode forward failed; decode steps run eagerly",
                               exc_info=True)
                self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager and not tp and one_device:
            # Larger batches than the biggest bucket run eagerly.
            max_bs = min(config.cuda_graph_max_bs or config.max_num_seqs, config.max_num_seqs, 512)
            try:
                self.use_graphs(max_bs, max_model_len)
            except Exception:  # a model whose forward cannot be captured still serves, eagerly
                logger.warning("hf_paged: CUDA graph capture failed; decode steps run eagerly "
                               "(enforce_eager=True skips the attempt)", exc_info=True)
                self.graphs = None

    def use_graphs(self, max_bs: int, max_model_len: int, *, capture: bool = True, compile: bool = False,
                   graph_api: Any = None) -> None:
        """Run decode steps of up to ``max_bs`` sequences through :class:`~hf_paged.engine.graphs.DecodeGraphs`
        (captured as CUDA graphs; ``capture=False`` runs the same static buffers eagerly, ``compile=True``
        through torch.compile; ``graph_api``: a stand-in for torch.cuda's graphs, for tests)."""
        from .graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.pool, max_bs=max_bs, max_model_len=max_model_len,
                                   device=self.device, capture=capture, compile=compile, graph_api=graph_api,
                                   adapters=self.adapters)

    def run(self, schedule: Schedule, every_position: list[bool] | None = None,
            prev_ids: torch.Tensor | None = None,
            pick: tuple[list[int], bool] | None = None) -> torch.Tensor | Picked:
        """Logits (float32) of the last token of each sampling sequence, in schedule order; for a
        scheduled sequence with ``every_position[i]``, of every token of its chunk instead (its last
        row is then its sampling row, if it samples). ``prev_ids``: the sampled ids of the step still
        in flight (async scheduling), where the tokens not yet on the host come from. ``pick``: (rows,
        logprob), see :attr:`StepPlan.pick` (the caller takes either result)."""
        plan = self.plan(schedule, every_position)
        if pick is not None:
            plan.pick, plan.pick_logprob = pick
        if self.broadcast is not None:
            self.broadcast.send_step(plan)
            try:
                return self.execute(plan, prev_ids)
            except Exception as exc:  # the other ranks run (or wait in) this step's collectives: no next step
                raise TensorParallelError(f"a step failed on tensor-parallel rank 0 after the other ranks got it, "
                                          f"so the group is out of step: {type(exc).__name__}: {exc}") from exc
        return self.execute(plan, prev_ids)

    def plan(self, schedule: Schedule, every_position: list[bool] | None = None) -> StepPlan:
        """Pack all scheduled tokens into one row. With LoRA layers in the model, tokens are packed
        grouped by adapter (base model first), so each adapter's tokens are one contiguous run for the
        batched LoRA op; the kept logits stay in schedule order."""
        seqs = schedule.seqs
        lora = self.adapters is not None and self.adapters.has_layers
        order = range(len(seqs))
        if lora:
            order = sorted(order, key=lambda i: -1 if seqs[i].seq.adapter is None else seqs[i].seq.adapter.slot)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        q_lens: list[int] = []
        seq_lens: list[int] = []
        offsets = [0] * len(seqs)
        fill: list[tuple[int, int]] = []
        for i in order:
            s = seqs[i]
            seq, start, n = s.seq, s.start, s.num_tokens
            toks = seq.token_ids
            end = start + n
            offsets[i] = len(ids)
            tables.append(seq.table.blocks)
            q_lens.append(n)
            seq_lens.append(end)
            if n == 1 and end <= len(toks):  # a decode token on the host: the usual case, kept short
                ids.append(toks[start])
                positions.append(start)
                slots.append(s.slots[0])
                continue
            ids.extend(toks[start:end])
            if end > len(toks):  # its last token is still being sampled (async scheduling)
                fill.append((len(ids), seq.ahead_row))
                ids.append(0)
            positions.extend(range(start, end))
            slots.extend(s.slots)
        if every_position is None:
            keep = [offsets[i] + s.num_tokens - 1 for i, s in enumerate(seqs) if s.samples]
        else:
            keep = []
            for i, s in enumerate(seqs):
                if every_position[i]:
                    keep.extend(range(offsets[i], offsets[i] + s.num_tokens))
                elif s.samples:
                    keep.append(offsets[i] + s.num_tokens - 1)
        return StepPlan(ids, positions, slots, tables, q_lens, seq_lens, keep, list(schedule.copies),
                        [None if seqs[i].seq.adapter is None else seqs[i].seq.adapter.slot for i in order]
                        if lora else None, fill or None)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, prev_ids: torch.Tensor | None = None) -> torch.Tensor | Picked:
        """Run the model on ``plan``; the float32 logits of its ``keep`` rows, or for a ``pick`` plan of
        enough rows on a model :func:`fused_head` accepts, their :class:`Picked` tokens. ``prev_ids``: see
        :meth:`run`."""
        if plan.fill is not None and prev_ids is None:
            raise ValueError("the plan has tokens still being sampled: prev_ids is required")
        self.pool.copy_blocks(plan.copies)
        if self.graphs is not None and self.graphs.fits(plan):
            return self.graphs.run(plan, prev_ids)
        meta = PagedMetadata.build(self.pool, plan.slots, plan.tables, plan.q_lens, plan.seq_lens, None, self._rows)
        # ids, positions, kept rows (and the async fill) in one host tensor, one copy without waiting.
        n, k, m = len(plan.ids), len(plan.keep), len(plan.fill or ())
        host = host_tensor(plan.ids + plan.positions + plan.keep
                           + ([d for d, _ in plan.fill] + [r for _, r in plan.fill] if m else []))
        dev = to_device(host, self.device)
        input_ids, position_ids, keep_t = dev[:n], dev[n:2 * n][None], dev[2 * n:2 * n + k]
        if m:
            dst, src = dev[2 * n + k:2 * n + k + m], dev[2 * n + k + m:]
            input_ids = input_ids.index_copy(0, dst, to_device(prev_ids, self.device).index_select(0, src))
        input_ids = input_ids[None]
        kwargs = {}
        # Only where the picks are at least half the kept rows: the other rows' logits read the output layer
        # once more, which a few picks do not repay.
        fused = self.head if plan.pick is not None and len(plan.pick) >= FUSED_HEAD_MIN_ROWS \
            and 2 * len(plan.pick) >= k else None
        if self._logits_to_keep and fused is None:
            kwargs["logits_to_keep"] = keep_t
        with contextlib.ExitStack() as stack:
            if plan.lora_slots is not None:
                batch = LoraBatch.build(plan.lora_slots, plan.q_lens, self.device)
                stack.enter_context(self.adapters.active(batch))
            if fused is not None:
                base, head, vocab = fused
                # The wrapped model's own pre-hook (bypassed here) marks an engine step: checks meant for
                # padded batches (GPT-2's pad-id lookup, a host sync) are then skipped.
                state = getattr(self.model, "_hf_paged", None)
                if state is not None:
                    state.engine_step = True
                try:
                    hidden = base(input_ids=input_ids, position_ids=position_ids, paged_metadata=meta,
                                  use_cache=False)[0][0].index_select(0, keep_t)
                finally:
                    if state is not None:
                        state.engine_step = False
                from ..kernels import cpu

                rows, rest, logits = plan.pick, None, None
                if len(rows) < k:  # the other rows sample from their logits
                    chosen = set(rows)
                    rest = [i for i in range(k) if i not in chosen]
                    logits = head(hidden[rest]).float()
                    hidden = hidden[rows]
                ids, lps = cpu.head_argmax(hidden, head.weight, head.bias, vocab, plan.pick_logprob)
                return Picked(ids, lps, rows, logits, rest)
            out = self.model(input_ids=input_ids, position_ids=position_ids, paged_metadata=meta,
                             use_cache=False, **kwargs)
        logits = out.logits[0]
        if not self._logits_to_keep:
            logits = logits.index_select(0, keep_t)
        return logits.float()
