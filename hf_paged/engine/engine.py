"""Engine: the core of one step, ``schedule -> run -> sample -> postprocess``, and nothing about delivery.

It knows sequences, blocks and tokens; it returns one plain :class:`TokenRecord` per generated token
and never detokenizes, emits or touches a request handle (that is :mod:`~hf_paged.engine.delivery`'s
job, on the same thread today; the seam lets a GPU loop run step N+1 while step N is delivered).

Example::

    engine = Engine(model, pool, max_num_seqs=64, max_batch_tokens=2048, max_model_len=4096)
    seqs = engine.add(prompt_ids, params)
    while engine.has_work():
        for rec in engine.step():
            print(rec.seq_id, rec.token, rec.finish_reason)
"""
from __future__ import annotations

import itertools
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ..kv.metadata import to_device
from ..kv.pool import KVPool
from .grammar import Masks, dead_end_error, new_matcher, rejected_error
from .history import processes
from .outputs import FinishReason
from .params import SamplingParams
from .runner import Picked, Runner
from .device_sampler import DeviceSampler
from .sampler import LOGPROB_FLOOR, Ready, SampleOutput, Sampler, SamplingRow
from .scheduler import Schedule, Scheduler
from .sequence import Sequence, SeqStatus
from .stats import EngineStats


@dataclass(slots=True)
class TokenRecord:
    """One token the step generated for sequence ``seq_id``; ``finish_reason`` when it ended the
    sequence (EOS or length: stop strings are found by delivery, which then calls :meth:`Engine.finish`)."""

    seq_id: int
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None  # with finish_reason ERROR and token -1: why the sequence (and its request) failed


def make_sampler(vocab_size: int, device: torch.device) -> Sampler | DeviceSampler:
    """The host sampler on CPU (numpy argmax, candidate-only warping: the fastest there), the
    vectorised one elsewhere (one copy back per step). ``HF_PAGED_SAMPLER=host|device`` forces one."""
    kind = os.environ.get("HF_PAGED_SAMPLER", "").strip().lower() or ("host" if device.type == "cpu" else "device")
    if kind not in ("host", "device"):
        raise ValueError(f"HF_PAGED_SAMPLER must be host or device, got {kind!r}")
    return Sampler(vocab_size) if kind == "host" else DeviceSampler(vocab_size)


@dataclass(slots=True)
class LaunchedForward:
    """A step whose forward is queued and whose sampling is not (:meth:`Engine.launch_forward`)."""

    sampling: list[Sequence]
    logits: torch.Tensor | Picked  # Picked: the fused greedy head's tokens (Engine._greedy_pick)
    rows: list[int]  # the logits row of each sampling sequence (siblings share their parent's)


@dataclass(slots=True)
class PendingStep:
    """A launched step: the sequences that sample and their (possibly not yet arrived) tokens."""

    seqs: list[Sequence]
    output: Any  # .result() -> SampleOutput
    dead: list[Sequence] | None = None  # constrained sequences whose grammar allowed no token: they fail


class Engine:
    def __init__(self, model: torch.nn.Module, pool: KVPool, *, max_num_seqs: int, max_batch_tokens: int,
                 max_model_len: int, adapters: Any = None) -> None:
        self.pool = pool
        self.scheduler = Scheduler(pool.allocator, max_num_seqs, max_batch_tokens)
        self.runner = Runner(model, pool, adapters)
        self.sampler = make_sampler(model.config.vocab_size, self.runner.device)
        self.masks = Masks(model.config.vocab_size)
        # The runner's fused greedy head serves the host sampler's plain greedy rows (CPU).
        self._fused_head = self.runner.head is not None and isinstance(self.sampler, Sampler)
        self.max_model_len = max_model_len
        self._ids = itertools.count()
        self.tokens_generated = 0
        self.steps = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=64)  # (time, tokens) per step
        self._dead: list[Sequence] = []  # sampled (_sample) with an empty grammar mask, for the PendingStep
        self._rejected = 0  # records of the step being completed that fail a sequence (_postprocess)

    # ------------------------------------------------------------------ sequences
    def add(self, prompt_ids: list[int], params: SamplingParams, grammar: Any = None,
            adapter: Any = None) -> list[Sequence]:
        """Queue ``num_return_sequences`` sequences for one prompt; returns them, index order.
        ``grammar``: the compiled constraint of ``params`` (each sequence gets its own matcher);
        ``adapter``: the :class:`~hf_paged.lora.Adapter` they run (None: the base model)."""
        if adapter is not None and adapter.unloaded:
            raise ValueError(f"adapter: {adapter.name!r} was unloaded before this request started")
        if not prompt_ids:
            raise ValueError("prompt: encodes to no tokens")
        if not self.scheduler.has_work() and self.runner.weights_changed():  # checked when idle: cached K/V
            self.pool.allocator.reset_prefix_cache()  # of the old weights must not serve (an RL loop's update)
        seqs = []
        for i in range(params.num_return_sequences):
            gen = torch.Generator().manual_seed(params.seed + i) if params.seed is not None else None
            seqs.append(Sequence(next(self._ids), list(prompt_ids), len(prompt_ids), params, i, generator=gen,
                                 matcher=new_matcher(grammar, params.eos_token_id) if grammar is not None else None,
                                 adapter=adapter))
        first = seqs[0]
        # Siblings wait for the first one's prompt and then share its blocks (copy-on-write).
        first.children = seqs[1:]
        for s in first.children:
            s.status = SeqStatus.FORKING
        self.scheduler.add(first)
        return seqs

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End ``seq`` now (a stop string, a cancel, a failure) and give its blocks back."""
        if seq.finished:
            seq.finish_reason = reason  # a stop string found on the token that also hit EOS or length
        elif seq.status is SeqStatus.FORKING:  # holds no block yet
            seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        else:
            self.scheduler.finish(seq, reason)

    def sequences_of(self, adapter: Any) -> int:
        """Unfinished sequences that run ``adapter``."""
        return sum(s.adapter is adapter for s in (*self.scheduler.running, *self.scheduler.waiting))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ step
    def step(self) -> list[TokenRecord]:
        """schedule -> run -> sample -> postprocess; one record per sampled token."""
        pending = self.launch()
        return self.complete(pending) if pending is not None else []

    def launch(self, ahead: "PendingStep | None" = None) -> "PendingStep | None":
        """Schedule a step and start it: the forward and the sampling are queued on the device, and on
        an asynchronous device (CUDA) this returns before they finish, so the caller can do host work
        (deliver the previous step) meanwhile. None when nothing is scheduled. Each launched step is
        finished with :meth:`complete`, in launch order.

        ``ahead``: async scheduling. A launched step not completed yet: this step is scheduled as if its
        sampled tokens were known, and their ids go from its output into this step's input on the device,
        so the host never waits between steps. A sequence that step ends (EOS, a stop string) has run one
        step too many; that token is dropped. :meth:`can_plan_ahead` must allow it, and no unfinished
        sequence of ``ahead`` may have a grammar or n-gram bans (their sampling needs the tokens on the host:
        use :meth:`launch_forward`, :meth:`complete` ``ahead`` and :meth:`launch_sample`, as the Stepper does).

        The same as :meth:`launch_forward` then :meth:`launch_sample`."""
        if ahead is not None and any(not s.finished and (s.matcher is not None or s.params.no_repeat_ngram_size > 0)
                                     for s in ahead.seqs):
            raise ValueError("launch(ahead=...): a sequence in flight has a grammar or n-gram bans; launch_forward, "
                             "complete the step in flight, then launch_sample")
        fwd = self.launch_forward(ahead)
        return None if fwd is None else self.launch_sample(fwd)

    def launch_forward(self, ahead: "PendingStep | None" = None) -> "LaunchedForward | None":
        """The first half of :meth:`launch`: schedule the step and queue its forward (``ahead``: as there,
        but only :meth:`can_plan_ahead` must allow it). None when nothing is scheduled."""
        skip: set[Sequence] = set()
        prev_ids = None
        if ahead is not None:
            # Sequences whose token in flight is surely their last (length) are not scheduled again.
            skip = {s for s in ahead.seqs if not s.finished and (
                s.num_generated + s.num_ahead >= s.params.max_new_tokens
                or s.num_tokens + s.num_ahead >= self.max_model_len)}
            prev_ids = ahead.output.device_ids
            if prev_ids is None:  # sampled on the host: the ids are there already
                prev_ids = torch.tensor(ahead.output.result().tokens, dtype=torch.long)
        sched = self.scheduler.schedule(skip)
        if not sched.seqs:
            return None
        every = [s.seq.params.prompt_logprobs is not None and s.start < s.seq.num_prompt for s in sched.seqs]
        pick = self._greedy_pick(sched) if self._fused_head and self.runner.broadcast is None \
            and not any(every) else None
        logits = self.runner.run(sched, every if any(every) else None, prev_ids, pick)
        if any(every):
            logits = self._prompt_logprobs(sched, every, logits)
        sampling = self.scheduler.advance(sched.seqs)
        rows = self.scheduler.fork_siblings(sampling)
        return LaunchedForward(sampling, logits, rows)

    @staticmethod
    def _greedy_pick(sched: Schedule) -> tuple[list[int], bool] | None:
        """The sampling rows of ``sched`` (in schedule order) that take the host sampler's plain greedy path
        (greedy, no processor reads their tokens, ``min_new_tokens`` reached, no grammar, no top logprobs), and
        whether one of them asks for its token's logprob; None when there is none (see :attr:`StepPlan.pick`)."""
        rows: list[int] = []
        logprob = False
        k = 0
        for s in sched.seqs:
            if not s.samples:
                continue  # a prompt chunk that does not sample
            seq = s.seq
            p = seq.params
            if not (p.do_sample or seq.matcher is not None or p.top_logprobs
                    or processes(p, len(seq.token_ids) - seq.num_prompt + seq.num_ahead)):
                rows.append(k)
                logprob = logprob or p.logprobs
            k += 1
        return (rows, logprob) if rows else None

    def needs_tokens(self, fwd: "LaunchedForward") -> bool:
        """Whether a sequence that samples in ``fwd`` needs its token in flight on the host first: its
        grammar's mask or its n-gram bans read it. The caller then records the step in flight
        (:meth:`complete`) before :meth:`launch_sample`, while the device runs this forward."""
        return any(s.num_ahead and (s.matcher is not None or s.params.no_repeat_ngram_size > 0)
                   for s in fwd.sampling)

    def launch_sample(self, fwd: "LaunchedForward") -> "PendingStep":
        """The second half of :meth:`launch`: queue the sampling of ``fwd``'s rows."""
        sampling = fwd.sampling
        if self._dead:  # left by a launch that raised: it belongs to no step
            self._dead = []
        if isinstance(fwd.logits, Picked):
            out = self._picked(fwd)
        else:
            out = self._sample(sampling, fwd.logits, fwd.rows)
        for k, s in enumerate(sampling):
            s.num_ahead += 1
            s.ahead_row = k
        dead = None
        if self._dead:
            dead, self._dead = self._dead, []
        return PendingStep(sampling, out, dead)

    def _sample(self, sampling: list[Sequence], logits: torch.Tensor, rows: list[int]) -> Any:
        """Queue the sampling of ``sampling[k]`` from ``logits[rows[k]]``; its output (``.result()``)."""
        if len(rows) != logits.shape[0]:  # siblings share rows; else rows are 0..n-1 in order
            logits = logits.index_select(0, to_device(torch.tensor(rows), logits.device))
        if any(s.matcher is not None for s in sampling):
            # A sequence ended meanwhile (by the step completed in between) gets no mask: its token is dropped.
            for k in self.masks.apply(logits, [None if s.finished else s.matcher for s in sampling]):
                self._dead.append(sampling[k])
        # A sequence with a token in flight samples with that token counted (needs_tokens made sure that
        # nothing else about this step depends on its value). Each row names its sequence: the sampler keeps
        # its penalties' token history (PenaltyState) up to date itself, on the device. A sequence ended
        # meanwhile names none: its token is dropped, and its history may already be another's.
        return self.sampler.sample_async(logits, [SamplingRow(s.params, s.token_ids,
                                                              len(s.token_ids) - s.num_prompt + s.num_ahead,
                                                              s.generator, None if s.finished else s)
                                                  for s in sampling])

    def _picked(self, fwd: "LaunchedForward") -> Ready:
        """The output for a step through the fused head: its picked rows as the host sampler gives plain greedy
        rows, the others sampled from their logits (``Picked.logits``), in one :class:`SampleOutput`."""
        sampling, picked, rows = fwd.sampling, fwd.logits, fwd.rows
        ids = picked.ids.tolist()
        lps = picked.logprobs.tolist() if picked.logprobs is not None else None
        if lps is None and picked.rows == rows:  # every row picked, none shared (the usual greedy step)
            return Ready(SampleOutput(ids))
        at = {r: j for j, r in enumerate(picked.rows)}
        out = SampleOutput([ids[at[r]] if r in at else 0 for r in rows])
        others = [k for k, r in enumerate(rows) if r not in at]
        sub = None
        if others:
            rest = {r: j for j, r in enumerate(picked.rest)}
            sub = self._sample([sampling[k] for k in others], picked.logits, [rest[rows[k]] for k in others]).result()
        if lps is not None or (sub is not None and sub.logprobs is not None):
            out.logprobs, out.top_logprobs = [None] * len(rows), [[] for _ in rows]
        if lps is not None:
            for k, (s, r) in enumerate(zip(sampling, rows)):
                if r in at and s.params.logprobs:
                    lp = lps[at[r]]
                    out.logprobs[k] = lp if lp >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN fails >= too
        if sub is not None:
            for j, k in enumerate(others):
                out.tokens[k] = sub.tokens[j]
                if sub.logprobs is not None:
                    out.logprobs[k] = sub.logprobs[j]
                if sub.top_logprobs is not None:
                    out.top_logprobs[k] = sub.top_logprobs[j]
        return Ready(out)

    def can_plan_ahead(self, pending: "PendingStep") -> bool:
        """Whether the next step may be scheduled and its forward launched before ``pending``'s tokens are
        known: not while the runner broadcasts plans to tensor-parallel ranks (they would need the ids)."""
        return self.runner.broadcast is None

    def complete(self, pending: "PendingStep") -> list[TokenRecord]:
        """Wait for a launched step's tokens and record them. A sequence finished in between (a stop
        string found while delivering the previous step, a cancel) drops its token."""
        out = pending.output.result()
        sampling = pending.seqs
        for s in sampling:
            s.num_ahead -= 1
        failed = [self._fail(s, dead_end_error(s)) for s in pending.dead if not s.finished] if pending.dead else None
        self._rejected = 0
        post = self._postprocess
        if out.logprobs is None and out.top_logprobs is None:
            records = [post(seq, t, None, None) for seq, t in zip(sampling, out.tokens) if not seq.finished]
        else:
            records = [post(seq, out.tokens[k], out.logprobs[k] if out.logprobs is not None else None,
                            out.top_logprobs[k] if out.top_logprobs is not None else None)
                       for k, seq in enumerate(sampling) if not seq.finished]
        # Only the recorded tokens count: one sampled for a sequence that ended meanwhile is dropped, and one its
        # constraint rejected.
        n = len(records) - self._rejected
        self._recent.append((time.monotonic(), n))
        self.tokens_generated += n
        self.steps += 1
        if failed:
            records.extend(failed)
        return records

    def _prompt_logprobs(self, sched: Schedule, every: list[bool], logits: torch.Tensor) -> torch.Tensor:
        """Record prompt log-probabilities from the full-chunk rows; returns the sampling rows only."""
        rows: list[int] = []
        at = 0
        for s, full in zip(sched.seqs, every):
            if not full:
                if s.samples:
                    rows.append(at)
                    at += 1
                continue
            seq, k = s.seq, s.seq.params.prompt_logprobs
            # Row r (position start + r) predicts token start + r + 1; record the prompt tokens among
            # those not recorded yet (a recomputed sequence passes over them again).
            first = max(s.start + 1, len(seq.prompt_logprobs) + 1)
            last = min(s.start + s.num_tokens, seq.num_prompt - 1)
            if first <= last:
                part = torch.log_softmax(logits[at + first - 1 - s.start: at + last - s.start], dim=-1)
                targets = torch.tensor(seq.token_ids[first:last + 1], device=logits.device).view(-1, 1)
                chosen = torch.nan_to_num(part.gather(1, targets).view(-1), nan=LOGPROB_FLOOR)
                chosen = chosen.clamp_(min=LOGPROB_FLOOR).tolist()
                tops = part.topk(k, dim=-1) if k else None
                for j, lp in enumerate(chosen):
                    top = [(t, max(v, LOGPROB_FLOOR)) for t, v in zip(tops.indices[j].tolist(), tops.values[j].tolist())
                           if v > -math.inf] if tops is not None else []
                    seq.prompt_logprobs.append((lp, top))
            at += s.num_tokens
            if s.samples:
                rows.append(at - 1)
        if not rows:
            return logits[:0]
        return logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))

    def _postprocess(self, seq: Sequence, token: int, logprob: float | None,
                     top: list[tuple[int, float]] | None) -> TokenRecord:
        p = seq.params
        if seq.matcher is not None and (  # fail closed: the token is not put in the output
                # EOS while min_new_tokens bans it comes from a row where nothing was left (the grammar's stop
                # token may be EOS: its matcher would take it)
                (len(seq.token_ids) - seq.num_prompt < p.min_new_tokens and token in p.eos_token_id)
                or not seq.matcher.accept_token(token)):
            self._rejected += 1
            return self._fail(seq, rejected_error(seq, token))
        toks = seq.token_ids
        toks.append(token)
        if p.logprobs:
            seq.logprobs.append(logprob)
        if p.top_logprobs:
            seq.top_logprobs.append(top)
        reason = None
        generated = len(toks) - seq.num_prompt
        # A matcher that took its stop token (EOS) has a complete output: it ends as EOS would.
        done = seq.matcher is not None and seq.matcher.is_terminated()
        if done or (not p.ignore_eos and token in p.eos_token_id and generated >= p.min_new_tokens):
            reason = FinishReason.STOP
        elif generated >= p.max_new_tokens or len(toks) >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return TokenRecord(seq.seq_id, token, logprob, top, reason)

    def _fail(self, seq: Sequence, error: str) -> TokenRecord:
        """End ``seq`` with ``error`` instead of recording a token; delivery fails its request."""
        self.scheduler.finish(seq, FinishReason.ERROR)
        return TokenRecord(seq.seq_id, -1, None, None, FinishReason.ERROR, error)

    # ------------------------------------------------------------------ stats
    def tokens_per_second(self, window: float = 5.0) -> float:
        """Tokens generated per second over the last ``window`` seconds (0 when idle)."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0][0], 1e-9)
        return sum(n for _, n in recent[1:]) / span

    def stats(self) -> EngineStats:
        snap, g = self.pool.allocator.snapshot(with_states=False), self.runner.graphs
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting), blocks_total=snap.total,
            blocks_used=snap.used, blocks_free=snap.free, blocks_cached=snap.cached,
            prefix_hit_rate=self.pool.allocator.prefix_hit_rate, preemptions=self.scheduler.num_preemptions,
            tokens_generated=self.tokens_generated, tokens_per_s=self.tokens_per_second(), steps=self.steps,
            decode_path=g.mode if g is not None else "eager", graph_steps=g.steps_served if g is not None else 0)

