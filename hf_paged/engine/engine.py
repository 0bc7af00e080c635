"""Engine: the single-threaded step loop body: schedule -> run -> sample -> append/stop -> emit."""
from __future__ import annotations

import itertools
import time
from collections import deque

import torch

from ..kv.pool import KVPool
from .outputs import StreamEvent
from .request import Request
from .runner import Runner
from .sampler import Sampler, SamplingRow
from .scheduler import Scheduler
from .sequence import Sequence, SeqStatus


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, pool: KVPool, *, max_num_seqs: int,
                 max_batch_tokens: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.pool = pool
        self.scheduler = Scheduler(pool.allocator, max_num_seqs, max_batch_tokens)
        self.runner = Runner(model, pool)
        self.sampler = Sampler(model.config.vocab_size)
        self.max_model_len = max_model_len
        self._ids = itertools.count()
        self.requests: dict[str, Request] = {}
        self.tokens_generated = 0
        self.steps = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=64)  # (time, tokens) per step

    # ------------------------------------------------------------------ requests
    def add(self, req: Request, make_detok) -> None:
        p = req.params
        for i in range(p.num_return_sequences):
            gen = None
            if p.seed is not None:
                gen = torch.Generator().manual_seed(p.seed + i)
            seq = Sequence(next(self._ids), list(req.prompt_ids), len(req.prompt_ids), p, req, i,
                           generator=gen, detok=make_detok(req, p))
            req.seqs.append(seq)
        first = req.seqs[0]
        # Siblings wait for the first one's prompt and then share its blocks (copy-on-write).
        first.children = req.seqs[1:]
        for s in first.children:
            s.status = SeqStatus.FORKING
        self.scheduler.add(first)
        self.requests[req.request_id] = req

    def _stop(self, req: Request, reason: str) -> None:
        for seq in req.seqs:
            if not seq.finished:
                if seq.status is SeqStatus.FORKING:  # holds no block yet
                    seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
                else:
                    self.scheduler.finish(seq, reason)

    def cancel(self, req: Request) -> None:
        """Stop all of the request's sequences now and give their blocks back."""
        self._stop(req, "cancelled")
        self._finish_request(req)

    def fail(self, req: Request, error: str) -> None:
        self._stop(req, "error")
        self.requests.pop(req.request_id, None)
        if not req.done:
            req.emit(StreamEvent(req.request_id, 0, None, "", error=error, output=req.build_output(error)))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ step
    def step(self) -> list[Request]:
        """Run one batch; returns the requests touched (for error reporting by the caller)."""
        sched = self.scheduler.schedule()
        if not sched.seqs:
            return []
        logits = self.runner.run(sched)
        sampling: list[Sequence] = []
        rows: list[int] = []
        for s in sched.seqs:
            self.scheduler.advance(s)
            if s.samples:
                rows.append(len(sampling))
                sampling.append(s.seq)
        for j in range(len(sampling)):
            parent = sampling[j]
            for child in parent.children:
                if child.finished:
                    continue
                child.table = self.pool.allocator.fork(parent.table)
                child.num_computed = parent.num_computed
                self.scheduler.start(child)
                sampling.append(child)
                rows.append(j)
            parent.children = []
        if len(rows) != logits.shape[0]:
            logits = logits.index_select(0, torch.tensor(rows))
        out = self.sampler.sample(logits, [SamplingRow(s.params, s.token_ids, s.num_generated, s.generator)
                                           for s in sampling])
        now = time.monotonic()
        self._recent.append((now, len(sampling)))
        self.tokens_generated += len(sampling)
        self.steps += 1
        for k, seq in enumerate(sampling):
            lp = out.logprobs[k] if out.logprobs is not None else None
            top = out.top_logprobs[k] if out.top_logprobs is not None else None
            self._append(seq, out.tokens[k], lp, top)
        return [s.seq.request for s in sched.seqs]

    def _append(self, seq: Sequence, token: int, logprob, top) -> None:
        p = seq.params
        seq.token_ids.append(token)
        if p.logprobs:
            seq.logprobs.append(logprob)
        if p.top_logprobs:
            seq.top_logprobs.append(top)
        delta = seq.detok.push(token)
        reason = None
        if seq.detok.stopped is not None:
            reason = "stop"
        elif token in p.eos_token_id and not p.ignore_eos and seq.num_generated >= p.min_new_tokens:
            reason = "stop"
        elif seq.num_generated >= p.max_new_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            delta += seq.detok.flush()
        req = seq.request
        req.emit(StreamEvent(req.request_id, seq.index, token, delta, logprob, top, reason))
        if reason is not None:
            self._finish_request(req)

    def _finish_request(self, req: Request) -> None:
        if all(s.finished for s in req.seqs) and self.requests.pop(req.request_id, None) is not None:
            req.emit(StreamEvent(req.request_id, 0, None, "", output=req.build_output()))

    # ------------------------------------------------------------------ stats
    def tokens_per_second(self, window: float = 5.0) -> float:
        """Tokens generated per second over the last ``window`` seconds (0 when idle)."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0][0], 1e-9)
        return sum(n for _, n in recent[1:]) / span

    def stats(self) -> dict:
        a = self.pool.allocator
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            # used + cached + free = total; allocatable = cached + free (a cached block is evicted on demand)
            "blocks_total": a.num_blocks, "blocks_used": a.num_used, "blocks_free": a.num_free - a.num_evictable,
            "blocks_cached": a.num_evictable, "blocks_allocatable": a.num_free, "prefix_hit_rate": a.prefix_hit_rate,
            "preemptions": self.scheduler.num_preemptions, "tokens_generated": self.tokens_generated,
            "tokens_per_s": self.tokens_per_second(), "steps": self.steps,
        }
