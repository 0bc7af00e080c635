"""BlockAllocator: unit tests and random operation sequences checked against every invariant."""
from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_paged.kv.blocks import BlockAllocator, BlockTable, KVCacheFullError


def test_append_allocates_on_demand_and_free_returns_everything():
    a = BlockAllocator(8, 4)
    t = BlockTable()
    slots, copies = a.append_slots(t, 6)
    assert copies == [] and len(t.blocks) == 2 and t.num_tokens == 6
    assert slots[:4] == [t.blocks[0] * 4 + i for i in range(4)]
    assert slots[4:] == [t.blocks[1] * 4, t.blocks[1] * 4 + 1]
    slots, _ = a.append_slots(t, 2)
    assert len(t.blocks) == 2 and slots == [t.blocks[1] * 4 + 2, t.blocks[1] * 4 + 3]
    a.check([t])
    a.free(t)
    assert a.num_free == 8 and t.blocks == []
    a.check([])


def test_fork_shares_and_copy_on_write_copies_the_partial_block():
    a = BlockAllocator(8, 4)
    parent = BlockTable()
    a.append_slots(parent, 6)
    child = a.fork(parent)
    assert child.blocks == parent.blocks and a.num_used == 2
    assert all(a.ref_count(b) == 2 for b in parent.blocks)
    slots, copies = a.append_slots(child, 1)
    assert copies == [(parent.blocks[1], child.blocks[1])]
    assert child.blocks[0] == parent.blocks[0] and child.blocks[1] != parent.blocks[1]
    assert slots == [child.blocks[1] * 4 + 2]
    # The parent is the only owner of its last block now: no copy.
    _, copies = a.append_slots(parent, 1)
    assert copies == []
    a.check([parent, child])
    a.free(parent)
    a.free(child)
    a.check([])


def test_full_shared_block_needs_no_copy():
    a = BlockAllocator(8, 4)
    p = BlockTable()
    a.append_slots(p, 4)
    c = a.fork(p)
    _, copies = a.append_slots(c, 1)
    assert copies == [] and c.blocks[0] == p.blocks[0]
    a.free(p), a.free(c)
    a.check([])


def test_decode_slot_only_into_an_unpublished_block_of_its_own():
    """decode_slot reserves one slot where the token goes into the table's own partial, unpublished last block,
    and refuses (-1, nothing changed) an empty table, a full last block, a shared one and a published one."""
    a = BlockAllocator(8, 4)
    t = BlockTable()
    assert a.decode_slot(t) == -1 and t.num_tokens == 0  # no block yet
    a.append_slots(t, 2)
    assert a.decode_slot(t) == t.blocks[0] * 4 + 2 and t.num_tokens == 3
    assert a.decode_slot(t) == t.blocks[0] * 4 + 3 and t.num_tokens == 4
    assert a.decode_slot(t) == -1 and t.num_tokens == 4  # full: append_slots takes a new block
    a.append_slots(t, 1)
    child = a.fork(t)
    assert a.decode_slot(t) == -1 and a.decode_slot(child) == -1 and t.num_tokens == child.num_tokens == 5
    a.free(child)
    assert a.decode_slot(t) == t.blocks[1] * 4 + 1  # its own again
    # A partial block left published (a truncation of a shared table keeps it in the prefix index) is refused.
    a.append_slots(t, 2)
    a.publish(t, list(range(t.num_tokens)))  # both blocks full and published
    other = a.fork(t)
    a.truncate(t, 5)
    a.free(other)
    assert a.ref_count(t.blocks[1]) == 1 and a.num_cached == 2
    assert a.decode_slot(t) == -1 and t.num_tokens == 5
    # Nor is it written into by append_slots: the token goes into a copy, and the cached block stays as it was.
    cached = t.blocks[1]
    assert a.blocks_needed(t, 1) == 1
    slots, copies = a.append_slots(t, 1)
    assert copies == [(cached, t.blocks[1])] and t.blocks[1] != cached and slots == [t.blocks[1] * 4 + 1]
    assert a.ref_count(cached) == 0 and a.num_cached == 2  # unreferenced, still a prefix-cache hit
    hit = a.match_prefix(list(range(8)))
    assert hit.blocks[1] == cached
    a.free(hit)
    a.free(t)
    a.check([])


def test_out_of_blocks_is_all_or_nothing():
    a = BlockAllocator(2, 4)
    t = BlockTable()
    a.append_slots(t, 5)
    with pytest.raises(KVCacheFullError, match="kv_memory"):
        a.append_slots(t, 4)
    assert t.num_tokens == 5 and len(t.blocks) == 2
    a.check([t])
    a.free(t)


def test_double_free_is_detected():
    a = BlockAllocator(4, 4)
    t = BlockTable()
    a.append_slots(t, 3)
    stale = BlockTable(list(t.blocks), t.num_tokens)
    a.free(t)
    with pytest.raises(AssertionError, match="double free"):
        a.free(stale)


def test_prefix_cache_hit_and_lru_reuse():
    a = BlockAllocator(4, 2)
    tokens = [5, 6, 7, 8, 9]
    t = BlockTable()
    a.append_slots(t, 5)
    a.publish(t, tokens)
    assert a.num_cached == 2  # two full blocks
    first_two = t.blocks[:2]
    a.free(t)
    assert a.num_free == 4 and a.num_cached == 2
    hit = a.match_prefix(tokens + [1, 2], max_tokens=6)
    assert hit.blocks == first_two and hit.num_tokens == 4
    assert a.prefix_hits == 2
    # Another prompt that diverges in the second block hits only the first.
    other = a.match_prefix([5, 6, 0, 0, 1])
    assert other.blocks == first_two[:1]
    # Hit rate: reused blocks over every full prompt block probed (3 hits of 3 + 2 blocks).
    assert a.prefix_queries == 5 and a.prefix_hit_rate == pytest.approx(3 / 5)
    a.free(hit), a.free(other)
    # Allocation uses never-cached blocks before evicting cached ones.
    t2 = BlockTable()
    a.append_slots(t2, 4)
    assert not set(t2.blocks) & set(first_two)
    a.append_slots(t2, 2)  # must evict the least recently used cached block
    assert a.num_cached == 1
    a.check([t2])
    a.free(t2)
    a.check([])


def test_truncate_unpublishes_a_block_that_will_be_rewritten():
    a = BlockAllocator(4, 2)
    t = BlockTable()
    a.append_slots(t, 4)
    a.publish(t, [1, 2, 3, 4])
    a.truncate(t, 3)
    assert a.num_cached == 1 and len(t.hashes) == 1
    a.check([t])
    a.free(t)


# ---------------------------------------------------------------- property-based
ops = st.lists(
    st.tuples(st.sampled_from(["new", "append", "fork", "free", "publish", "match", "truncate"]),
              st.integers(0, 50), st.integers(1, 40)),
    min_size=1, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, block_size=st.sampled_from([1, 2, 4, 8]), num_blocks=st.integers(1, 24))
def test_random_operation_sequences_keep_invariants(ops, block_size, num_blocks):
    a = BlockAllocator(num_blocks, block_size)
    tables: list[tuple[BlockTable, list[int]]] = []
    store: dict[int, int] = {}  # simulated KV pool: slot -> token written there
    for op, pick, n in ops:
        target = tables[pick % len(tables)] if tables else None
        if op == "new" or target is None:
            tables.append((BlockTable(), []))
        elif op == "append":
            t, toks = target
            before = (list(t.blocks), t.num_tokens)
            try:
                slots, copies = a.append_slots(t, n)
            except KVCacheFullError:
                assert (t.blocks, t.num_tokens) == before
            else:
                new = list(range(pick, pick + n))
                assert len(slots) == n == len(set(slots))
                for src, dst in copies:
                    assert a.ref_count(dst) == 1 and src != dst
                    for i in range(block_size):
                        if src * block_size + i in store:
                            store[dst * block_size + i] = store[src * block_size + i]
                for slot, tok in zip(slots, new):
                    store[slot] = tok
                toks.extend(new)
        elif op == "fork":
            t, toks = target
            tables.append((a.fork(t), list(toks)))
        elif op == "free":
            a.free(target[0])
            tables.remove(target)
        elif op == "publish":
            a.publish(*target)
        elif op == "match":
            t, toks = target
            hit = a.match_prefix(toks)
            assert hit.num_tokens <= len(toks) and hit.num_tokens % block_size == 0
            tables.append((hit, list(toks[: hit.num_tokens])))
        elif op == "truncate":
            t, toks = target
            keep = min(n, t.num_tokens)
            a.truncate(t, keep)
            del toks[keep:]
        a.check([t for t, _ in tables])
        # Every table reads back exactly its own tokens: copy-on-write and prefix hits never let
        # one sequence's writes show up in another's blocks.
        for t, toks in tables:
            got = [store.get(t.blocks[p // block_size] * block_size + p % block_size) for p in range(t.num_tokens)]
            assert got == toks
    for t, _ in tables:
        a.free(t)
    a.check([])
    assert a.num_free == num_blocks


def _resident_kib(t) -> int:
    """Resident KiB of the memory map holding ``t`` (Linux /proc/self/smaps)."""
    start = t.data_ptr()
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= start < hi:
                for extra in lines[i + 1:]:
                    if extra.startswith("Rss:"):
                        return int(extra.split()[1])
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous maps and /proc/self/smaps: Linux")
def test_cpu_pool_tensors_are_zero_and_take_memory_only_where_written():
    import gc

    import torch

    from hf_paged.kv.pool import KVPool, LayerSpec

    spec = LayerSpec(num_kv_heads=4, head_dim=64, dtype=torch.bfloat16, device=torch.device("cpu"))
    pool = KVPool([spec], num_blocks=8192, block_size=16)  # 64 MiB per tensor
    gc.collect()  # the maps live as long as the tensors, not their Python mmap objects
    k = pool.k[0]
    assert k.shape == (8192, 16, 4, 64) and k.dtype == torch.bfloat16 and k.is_contiguous()
    assert _resident_kib(k) <= 4096  # reserved, not committed
    assert not k[:8].any() and not k[-8:].any()
    k[5].fill_(1.5)
    pool.copy_blocks([(5, 8000)])
    assert k[8000].eq(1.5).all() and not k[6].any()
    assert _resident_kib(k) <= 16 * 1024  # a few (huge) pages around the blocks touched
    k.fill_(2.0)  # every block written: all of it resident now
    assert _resident_kib(k) >= 64 * 1024 - 64
    small = KVPool([LayerSpec(1, 8, torch.float32, torch.device("cpu"))], num_blocks=4, block_size=16)
    assert not small.k[0].any()  # small pools: plain torch.zeros


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "fork", "free", "truncate", "step"]), st.integers(0, 40)),
                min_size=1, max_size=80))
def test_table_rows_always_equal_the_tables_converted_anew(ops):
    """TableRows (the runner's persistent block-table rows) against the plain padded conversion, under
    appends, copy-on-write forks, frees, truncations and tables that come and go; tiny capacity and
    width, so rows are dropped and the array widens along the way."""
    import numpy as np

    from hf_paged.kv.metadata import TableRows

    a = BlockAllocator(64, 2)
    rows = TableRows(capacity=4, width=1)
    tables = [BlockTable()]
    flat = np.full(8 * 80, -7, np.int32)  # one staging array for every step, as DecodeGraphs has
    seen: dict[int, tuple[list[int], list[int]]] = {}  # id -> (list, its blocks when last seen)
    for op, k in ops:
        t = tables[k % len(tables)]
        try:
            if op == "append":
                a.append_slots(t, 1 + k % 5)
            elif op == "fork" and t.blocks:
                tables.append(a.fork(t))
            elif op == "free":
                a.free(t)
                if len(tables) > 1:
                    tables.remove(t)
            elif op == "truncate":
                a.truncate(t, t.num_tokens // 2)
        except KVCacheFullError:
            pass
        # What TableRows relies on: a table's list only grows in place (anything else puts a new list there).
        for x in tables:
            before = seen.get(id(x.blocks))
            if before is not None and before[0] is x.blocks:
                assert x.blocks[: len(before[1])] == before[1], (op, before[1], x.blocks)
            seen[id(x.blocks)] = (x.blocks, list(x.blocks))
        step = [x.blocks for x in tables if x.blocks][: 1 + k % 6]
        width = max((len(b) for b in step), default=0) or 1
        want = np.array([b + [0] * (width - len(b)) for b in step], np.int32).reshape(-1, width)
        assert np.array_equal(rows.gather(step, width), want)
        w = rows.pack_into(step, flat, 80)  # the rows packed at the longest table's width
        assert w == width and np.array_equal(flat[: len(step) * w].reshape(-1, w), want)
        assert rows.pack_into(step, flat, 2) == min(width, 2)  # cut at the static width
        assert np.array_equal(flat[: len(step) * min(width, 2)].reshape(-1, min(width, 2)), want[:, :2])
    a.check(tables)


def test_prefix_chain_hashes_are_sha256_of_the_whole_prefix():
    """A hit compares a block's own tokens and salt; the tokens before it are vouched for by the chain alone, so
    the chain must be collision-resistant (vLLM's CVE-2025-25183: a crafted prompt colliding with Python's
    ``hash`` chain shares another user's K/V). Each link is SHA-256 of the parent digest and the int64 tokens."""
    import hashlib
    import struct

    from hf_paged.kv.blocks import _root, chain_hash

    roots = {_root(None), _root(1), _root(2)}
    assert len(roots) == 3 and all(len(r) == 32 for r in roots)
    first = chain_hash(_root(None), [1, 2, 3, 4])
    assert first == hashlib.sha256(_root(None) + struct.pack("<4q", 1, 2, 3, 4)).digest()
    assert chain_hash(first, [5, 6, 7, 8]) != chain_hash(chain_hash(_root(None), [1, 2, 3, 5]), [5, 6, 7, 8])
    a = BlockAllocator(8, 4)
    t = BlockTable()
    a.append_slots(t, 8)
    a.publish(t, [1, 2, 3, 4, 5, 6, 7, 8])
    assert t.hashes == [first, chain_hash(first, [5, 6, 7, 8])]
    hit = a.match_prefix([9, 2, 3, 4, 5, 6, 7, 8])  # the second block's tokens alone do not match
    assert hit.num_tokens == 0
    a.free(t)
    a.check()


def test_a_sequences_known_hashes_are_reused_by_publish(monkeypatch):
    """Publishing a block whose hash the sequence already holds (it looked it up before, or published it before
    a preemption) does not hash it again; a new one is appended to the sequence's list."""
    from hf_paged.kv import blocks

    calls = []
    real = blocks.chain_hash
    monkeypatch.setattr(blocks, "chain_hash", lambda parent, tokens: calls.append(1) or real(parent, tokens))
    a = BlockAllocator(8, 4)
    tokens, known = list(range(1, 9)), []
    t = BlockTable()
    a.append_slots(t, 8)
    a.publish(t, tokens, None, known)
    assert len(calls) == 2 and known == t.hashes
    a.free(t)  # preempted: recomputed into fresh blocks
    again = BlockTable()
    a.append_slots(again, 8)
    a.publish(again, tokens, None, known)
    assert len(calls) == 2 and again.hashes == known
    a.free(again)
    a.check()
