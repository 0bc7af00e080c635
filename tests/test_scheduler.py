"""The scheduler alone: which chunks sample, preemption order, and the blocks it leaves behind."""
from __future__ import annotations

from hf_paged.engine.params import SamplingParams
from hf_paged.engine.scheduler import Scheduler
from hf_paged.engine.sequence import Sequence, SeqStatus
from hf_paged.kv.blocks import BlockAllocator, BlockTable


def _seq(i: int, prompt_len: int) -> Sequence:
    return Sequence(i, list(range(100 + i, 100 + i + prompt_len)), prompt_len, SamplingParams(max_new_tokens=64))


def _samples(s) -> bool:
    """What ``ScheduledSeq.samples`` must say: the chunk reaches the last token, one in flight included."""
    return s.start + s.num_tokens == len(s.seq.token_ids) + s.seq.num_ahead


def test_samples_marks_the_chunks_that_reach_the_last_token():
    """Prompt chunks under a small token budget, decode tokens, and a decode token still in flight (async
    scheduling): ``samples`` is set when scheduled and equals the definition for each."""
    alloc = BlockAllocator(64, 4)
    sched = Scheduler(alloc, max_num_seqs=8, max_batch_tokens=6)
    seqs = [_seq(0, 9), _seq(1, 3), _seq(2, 5)]
    for s in seqs:
        sched.add(s)
    seen = []
    for step in range(12):
        out = sched.schedule()
        for s in out.seqs:
            assert s.samples == _samples(s), (step, s.seq.seq_id, s.start, s.num_tokens)
            seen.append(s.samples)
        for s in sched.advance(out.seqs):
            if step % 3 == 2:
                s.num_ahead += 1  # its next token is in flight: the next step feeds it before it is known
            else:
                s.token_ids.append(7)
        for s in list(sched.running):
            if s.num_ahead and step % 3 != 2:
                s.num_ahead -= 1  # the token in flight arrives
                s.token_ids.append(7)
    assert True in seen and False in seen  # both kinds of chunk were seen
    for s in seqs:
        sched.finish(s, None)
    alloc.check()
    assert alloc.num_used == 0


def test_budget_cut_decode_and_preemption_keep_samples_right():
    """A prompt chunk cut by the budget does not sample; a sequence preempted for blocks is left out of the step."""
    alloc = BlockAllocator(4, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=12)
    a, b = _seq(0, 8), _seq(1, 8)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_tokens, s.samples) for s in out.seqs] == [(0, 8, True), (1, 4, False)]
    assert sched.advance(out.seqs) == [a]
    a.token_ids.append(1)
    # a's decode token takes the last free block; b's second chunk then needs one: b, the newest, is preempted.
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_tokens, s.samples) for s in out.seqs] == [(0, 1, True)]
    assert out.preempted == [b] and b.status is SeqStatus.WAITING and b.num_computed == 0
    assert sched.advance(out.seqs) == [a]
    for s in (a, b):
        sched.finish(s, None)
    alloc.check()
    assert alloc.num_used == 0


def test_a_request_waiting_for_memory_hashes_its_prompt_once(monkeypatch):
    """The head of the queue looks its prompt up in the prefix cache each step until blocks free up; its chain
    hashes (SHA-256, ~2 us a block) are computed once and kept on the sequence, and the hit rate counts the
    lookup once, when the request is admitted."""
    from hf_paged.kv import blocks

    calls = []
    real = blocks.chain_hash
    monkeypatch.setattr(blocks, "chain_hash",
                        lambda parent, tokens: calls.append(tuple(tokens)) or real(parent, tokens))
    alloc = BlockAllocator(8, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=64)
    hog, big = _seq(0, 24), _seq(50, 20)  # the hog takes 6 of the 8 blocks; the other needs 5
    sched.add(hog)

    def step():
        out = sched.schedule()
        for s in sched.advance(out.seqs):
            s.token_ids.append(7)
        return [s.seq for s in out.seqs]

    assert step() == [hog]
    alloc.publish(hog.table, hog.token_ids)
    sched.add(big)
    calls.clear()
    queries = alloc.prefix_queries
    for _ in range(4):
        assert step() == [hog]  # no room for big yet
    assert alloc.prefix_queries == queries
    mine = [c for c in calls if c[0] >= 150]  # big's tokens (the hog publishes its own blocks meanwhile)
    assert mine == [(150, 151, 152, 153)] and len(big.block_hashes) == 1  # the first block missed: no more hashed
    sched.finish(hog, None)
    assert big in step()
    assert alloc.prefix_queries == queries + (20 - 1) // 4  # its full blocks but the last token's, once
    sched.finish(big, None)
    alloc.check()
    assert alloc.num_used == 0


def test_blocks_taken_between_the_check_and_the_append_leave_the_request_waiting(monkeypatch):
    """The pool is the wrapped model's: a generate() on another thread can take blocks between the scheduler's
    check and its append. The request then waits, as if the check had said so; the step goes on."""
    alloc = BlockAllocator(8, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=64)
    a, b = _seq(0, 16), _seq(1, 16)
    sched.add(a)
    sched.add(b)
    monkeypatch.setattr(alloc, "blocks_needed", lambda table, n: 0)  # the check passes; 4 + 4 blocks fit anyway
    other = BlockTable()
    alloc.append_slots(other, 4 * 4)  # "the other thread": only 4 blocks are left, for a alone
    out = sched.schedule()
    assert [s.seq for s in out.seqs] == [a] and list(sched.waiting) == [b] and not b.table.blocks
    alloc.free(other)
    for s in (a, b):
        sched.finish(s, None)
    alloc.check()
    assert alloc.num_used == 0


def test_siblings_outlive_a_first_sequence_finished_before_its_prompt():
    """n > 1: the siblings wait for the first sequence's prompt, then fork its blocks. Should the first end
    before its prompt is computed, the next one takes over the prompt and forks the rest: none is left waiting."""
    alloc = BlockAllocator(16, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_batch_tokens=4)
    params = SamplingParams(max_new_tokens=8)
    first, second, third = (Sequence(i, list(range(10, 20)), 10, params, i) for i in range(3))
    first.children = [second, third]
    for s in first.children:
        s.status = SeqStatus.FORKING
    sched.add(first)
    out = sched.schedule()  # a 4-token chunk of the 10-token prompt
    assert [s.seq for s in out.seqs] == [first] and not out.seqs[0].samples
    sched.advance(out.seqs)
    sched.finish(first, None)
    assert list(sched.waiting) == [second] and second.children == [third] and third.status is SeqStatus.FORKING
    steps = 0
    sampling = []
    while not sampling:  # its prompt: the first's cached block, then two chunks
        steps += 1
        sampling = sched.advance(sched.schedule().seqs)
    assert sampling == [second] and steps == 2
    sched.fork_siblings(sampling)
    assert sampling == [second, third] and third.status is SeqStatus.RUNNING
    for s in (second, third):
        sched.finish(s, None)
    alloc.check()
    assert alloc.num_used == 0
