"""Scheduler: which sequences run in the next step and how many tokens each, under a token budget.

Every step packs the decode token of each running sequence and chunks of waiting prompts into one
flat batch (chunked prefill) of at most ``max_batch_tokens``. Blocks come from the allocator on
demand; when none is left, the newest running sequence is preempted: its blocks are freed and it is
queued to be recomputed (prefix caching usually makes that recomputation cheap).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..kv.blocks import BlockAllocator, BlockTable, KVCacheFullError
from .outputs import FinishReason
from .sequence import Sequence, SeqStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens fed this step: token_ids[start:start+num_tokens]
    start: int  # == seq.num_computed when scheduled
    slots: list[int]
    copies: list[tuple[int, int]] | tuple[()]  # copy-on-write block copies to do before the forward
    # This chunk reaches the sequence's last token (a token in flight counts), so its logits give the next
    # token. Set when scheduled; read in the same Engine.launch_forward (the runner's plan, advance), where
    # no token is recorded in between.
    samples: bool


@dataclass(slots=True)
class Schedule:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def copies(self) -> list[tuple[int, int]]:
        return [c for s in self.seqs for c in s.copies]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_batch_tokens: int) -> None:
        if max_num_seqs < 1 or max_batch_tokens < 1:
            raise ValueError("max_num_seqs and max_batch_tokens must be positive")
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take ``seq`` out of the queues and give its blocks back."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:  # absent if never queued
            self.waiting.remove(seq)
        self.allocator.free(seq.table)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        kids = [c for c in seq.children if not c.finished]
        seq.children = []
        if kids:  # siblings still waiting for its prompt: the first computes it now (prefix hits), then forks
            kids[0].children = kids[1:]
            kids[0].status = SeqStatus.WAITING
            self.waiting.appendleft(kids[0])

    def fork_siblings(self, sampling: list[Sequence]) -> list[int]:
        """Start the siblings that waited for a sampling sequence's prompt: each gets a copy-on-write
        fork of its parent's block table and samples from its parent's logits row this step.

        Appends them to ``sampling`` and returns the logits row of every sequence in it."""
        rows = list(range(len(sampling)))
        for j in range(len(sampling)):
            parent = sampling[j]
            for child in parent.children:
                if child.finished:
                    continue
                child.table = self.allocator.fork(parent.table)
                child.num_computed = parent.num_computed
                child.status = SeqStatus.RUNNING
                self.running.append(child)
                sampling.append(child)
                rows.append(j)
            parent.children = []
        return rows

    # ------------------------------------------------------------------ step
    def schedule(self, skip: "set[Sequence] | frozenset[Sequence]" = frozenset()) -> Schedule:
        """The next step. ``skip``: running sequences to leave out (async scheduling: those whose token
        in flight is known to be their last)."""
        out = Schedule()
        budget = self.max_batch_tokens
        # 1. Sequences already running, oldest first: decode tokens and unfinished prompt chunks. (Runs for
        # every sequence at every step: names are bound locally and num_pending is spelled out.)
        running, scheduled = self.running, out.seqs
        append_slots, decode_slot = self.allocator.append_slots, self.allocator.decode_slot
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            pending = n = len(seq.token_ids) + seq.num_ahead - seq.num_computed  # seq.num_pending
            if n > budget:
                n = budget
            if n <= 0 or (skip and seq in skip):
                i += 1
                continue
            if n == 1:
                # A decode token into its own block: the usual case, with as few new objects as can be (each one
                # taken from memory the forward has just pushed out of the caches costs a miss).
                slot = decode_slot(seq.table)
                if slot >= 0:
                    scheduled.append(ScheduledSeq(seq, 1, seq.num_computed, [slot], (), pending == 1))
                    budget -= 1
                    i += 1
                    continue
            while True:
                try:
                    slots, copies = append_slots(seq.table, n)
                    break
                except KVCacheFullError:
                    victim = running[-1]
                    self._preempt(victim, out)
                    if victim is seq:
                        break
            if seq.status is not SeqStatus.RUNNING:  # preempted itself: nothing else to free
                break
            scheduled.append(ScheduledSeq(seq, n, seq.num_computed, slots, copies, n == pending))
            budget -= n
            i += 1
        # 2. Waiting prompts (and preempted sequences), first come first served. A prompt's siblings
        # (num_return_sequences) join the running batch once it is computed, so they count now, as do those
        # of prompts still being computed; a prompt with more siblings than max_num_seqs runs alone.
        forking = sum(not c.finished for s in self.running if s.children for c in s.children) if self.waiting else 0
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            kids = sum(not c.finished for c in seq.children)
            if self.running and len(self.running) + forking + 1 + kids > self.max_num_seqs:
                break
            looked = None
            if not seq.table.blocks and seq.params.prompt_logprobs is None:
                # Leave one token to compute: its logits give the next token. (A request for prompt
                # log-probabilities computes its whole prompt: a cached block holds K/V, not logits.)
                # Counted once admitted: a request waiting for memory looks its prompt up every step.
                hit = self.allocator.match_prefix(seq.token_ids, max_tokens=seq.num_tokens - 1,
                                                 salt=seq.cache_salt, known=seq.block_hashes, count=False)
                seq.table = hit
                seq.num_computed = hit.num_tokens
                looked = ((seq.num_tokens - 1) // self.allocator.block_size, len(hit.blocks))
            pending = seq.num_pending
            n = min(pending, budget)
            try:  # all or nothing (the pool may be shared with a generate() of the model on another thread)
                slots, copies = self.allocator.append_slots(seq.table, n)
            except KVCacheFullError:
                # Not now: give back the prefix hit (its blocks stay cached) and wait for space.
                self.allocator.free(seq.table)
                seq.table, seq.num_computed = BlockTable(), 0
                break
            if looked is not None and self.allocator.enable_prefix_caching:
                self.allocator.count_prefix(*looked)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            forking += kids
            out.seqs.append(ScheduledSeq(seq, n, seq.num_computed, slots, copies, n == pending))
            budget -= n
        return out

    def release_waiting(self) -> None:
        """Give back blocks a waiting sequence holds (a prefix hit looked up by a step that then failed): it
        looks its prompt up again when admitted."""
        for seq in self.waiting:
            if seq.table.blocks:
                self.allocator.free(seq.table)
                seq.table, seq.num_computed = BlockTable(), 0

    def _preempt(self, seq: Sequence, out: Schedule) -> None:
        """Free ``seq``'s blocks and queue it first in line for recomputation."""
        # The victim is the newest running sequence, never one already scheduled this step.
        self.running.remove(seq)
        self.allocator.free(seq.table)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def advance(self, scheduled: list[ScheduledSeq]) -> list[Sequence]:
        """Account the tokens just computed and publish the now-full blocks to the prefix cache; returns the
        sequences whose chunk samples (:attr:`ScheduledSeq.samples`), in order."""
        bs = self.allocator.block_size
        publish = self.allocator.publish
        sampling = []
        for sched in scheduled:
            seq = sched.seq
            seq.num_computed = sched.start + sched.num_tokens
            table = seq.table
            # A decode step fills a block once every block_size steps: call publish only when one may have.
            if table.num_tokens >= (len(table.hashes) + 1) * bs:
                publish(table, seq.token_ids, seq.cache_salt, seq.block_hashes)
            if sched.samples:
                sampling.append(seq)
        return sampling
