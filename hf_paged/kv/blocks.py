"""BlockAllocator: the bookkeeping of a paged KV pool, in pure Python (no torch).

Every block is either free or referenced. A referenced block may be shared by several sequences
(forks, beams, prefix-cache hits); writing into a shared, partially filled block first copies it
(copy-on-write). Full blocks can be published under a chain hash of their tokens (automatic prefix
caching); when their last reference goes they stay cached and are reused LRU-first.

Example::

    alloc = BlockAllocator(num_blocks=64, block_size=16)
    table = BlockTable()
    slots, copies = alloc.append_slots(table, 40)     # 3 blocks, slots for 40 tokens
    child = alloc.fork(table)                          # shares all 3 blocks
    slots, copies = alloc.append_slots(child, 1)       # copy-on-write of the shared last block
    alloc.free(table); alloc.free(child); alloc.check()
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .prefix_hash import _root, chain_hash


class KVCacheFullError(RuntimeError):
    """The KV pool has no free block left for the request."""


@dataclass(slots=True)
class BlockTable:
    """The blocks of one sequence, in order, and how many token slots of them are filled.

    ``blocks`` only ever grows in place; any other change (a copy-on-write of the last block, a truncation,
    a free) puts a new list there. So a list seen before with the same length holds the same blocks, which
    is how the runner's :class:`~hf_paged.kv.metadata.TableRows` finds the tables that changed.
    """

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    # Chain hashes of the leading full blocks already published to the prefix cache.
    hashes: list[bytes] = field(default_factory=list)


_LIVE: "weakref.WeakSet[BlockAllocator]" = weakref.WeakSet()


def live_allocators() -> list["BlockAllocator"]:
    """Every allocator still alive in this process (tests check all of them after each test)."""
    return list(_LIVE)


def _link(known: list[bytes] | None, i: int, parent: bytes, chunk: tuple[int, ...]) -> bytes:
    """Block ``i``'s chain hash: from a sequence's ``known`` list when there, else computed (and appended to it
    when it extends the list)."""
    if known is not None and i < len(known):
        return known[i]
    h = chain_hash(parent, chunk)
    if known is not None and i == len(known):
        known.append(h)
    return h


BLOCK_EMPTY, BLOCK_USED, BLOCK_CACHED = 0, 1, 2


@dataclass(slots=True, frozen=True)
class PoolSnapshot:
    """The pool at one instant: ``used`` (referenced) + ``cached`` (unreferenced, holds a prefix,
    evicted on demand) + ``free`` (holds nothing) = ``total``; ``states`` one entry per block."""

    total: int
    used: int
    cached: int
    free: int
    states: list[int] | None = None


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # Unreferenced blocks that still hold a published prefix; oldest first (evicted first).
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash: list[bytes | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._salt: list[int | None] = [None] * num_blocks  # e.g. the LoRA adapter the K/V was computed under
        self._by_hash: dict[bytes, int] = {}
        self._lock = threading.RLock()
        self.prefix_queries = 0  # full blocks looked up in the prefix cache
        self.prefix_hits = 0
        _LIVE.add(self)

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (never-used plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks holding a published prefix (referenced or not)."""
        return len(self._by_hash)

    @property
    def num_evictable(self) -> int:
        """Unreferenced blocks that still hold a published prefix (reused on a hit, evicted LRU)."""
        return len(self._evictable)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def snapshot(self, with_states: bool = True) -> "PoolSnapshot":
        """Counts (and, with ``with_states``, each block's state), consistent with each other even
        while another thread allocates."""
        with self._lock:
            cached = len(self._evictable)
            used = self.num_blocks - len(self._free) - cached
            states = None
            if with_states:
                evictable = self._evictable
                states = [BLOCK_USED if r > 0 else (BLOCK_CACHED if b in evictable else BLOCK_EMPTY)
                          for b, r in enumerate(self._ref)]
            return PoolSnapshot(self.num_blocks, used, cached, len(self._free), states)

    def blocks_needed(self, table: BlockTable, num_new_tokens: int) -> int:
        """New blocks ``append_slots(table, num_new_tokens)`` would take, copy-on-write included."""
        bs = self.block_size
        total = -(-(table.num_tokens + num_new_tokens) // bs) - len(table.blocks)
        if num_new_tokens > 0 and self._copy_on_write(table):
            total += 1
        return max(total, 0)

    # ------------------------------------------------------------------ raw blocks
    def _take(self, n: int) -> list[int]:
        if n > self.num_free:
            raise KVCacheFullError(
                f"KV cache full: {n} block(s) needed, {self.num_free} free of {self.num_blocks} "
                f"(block_size={self.block_size}); give the cache more memory (kv_memory / num_blocks) "
                "or run fewer or shorter sequences at once"
            )
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._unpublish(b)
            self._ref[b] = 1
            out.append(b)
        return out

    def _release(self, block: int) -> None:
        ref = self._ref[block]
        if ref <= 0:
            raise AssertionError(f"double free of block {block}")
        self._ref[block] = ref - 1
        if ref == 1:
            if self._hash[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _unpublish(self, block: int) -> None:
        h = self._hash[block]
        if h is not None and self._by_hash.get(h) == block:
            del self._by_hash[h]
        self._hash[block] = None
        self._tokens[block] = None
        self._salt[block] = None

    # ------------------------------------------------------------------ tables
    def append_slots(self, table: BlockTable, n: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Reserve slots for ``n`` new tokens at the end of ``table``.

        Returns the slots and the ``(src, dst)`` block copies the caller must perform before writing
        (copy-on-write of a shared, partially filled last block). All or nothing: on
        :class:`KVCacheFullError` the table is unchanged.
        """
        if n == 1:
            slot = self.decode_slot(table)
            if slot >= 0:
                return [slot], []
        bs = self.block_size
        with self._lock:
            copies: list[tuple[int, int]] = []
            if n <= 0:
                return [], copies
            need = self.blocks_needed(table, n)
            if need > self.num_free:
                self._take(need)  # raises with the full explanation
            if self._copy_on_write(table):
                old = table.blocks[-1]
                new = self._take(1)[0]
                self._release(old)
                table.blocks = [*table.blocks[:-1], new]  # a new list: see BlockTable
                copies.append((old, new))
            extra = -(-(table.num_tokens + n) // bs) - len(table.blocks)
            if extra > 0:
                table.blocks.extend(self._take(extra))
            start = table.num_tokens
            blocks = table.blocks
            slots = [blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            table.num_tokens = start + n
            return slots, copies

    def _copy_on_write(self, table: BlockTable) -> bool:
        """Whether the next token of ``table`` must go into a copy of its partial last block: the block is shared,
        or still in the prefix index (a truncation leaves a shared block there; once the others let go of it, its
        cached K/V must stay as they are for later prefix hits)."""
        if not table.num_tokens % self.block_size:
            return False
        last = table.blocks[-1]
        return self._ref[last] > 1 or self._hash[last] is not None

    def decode_slot(self, table: BlockTable) -> int:
        """Reserve the slot of one more token of ``table`` and return it, where that token goes into an unpublished
        last block of the table's own with room left (a decode step's usual case); else -1, and nothing changes
        (:meth:`append_slots` then does the rest). No lock and no allocation but the slot's int: no other thread
        can reach that block (a prefix match finds published blocks only, and only this table's owner forks or
        frees it), nothing else here changes, and snapshot() does not read tables."""
        bs = self.block_size
        at = table.num_tokens
        if at % bs:
            last = table.blocks[-1]
            if self._ref[last] == 1 and self._hash[last] is None:
                table.num_tokens = at + 1
                return last * bs + at % bs
        return -1

    def fork(self, table: BlockTable) -> BlockTable:
        """A new table sharing every block of ``table`` (copy-on-write on the next append)."""
        with self._lock:
            for b in table.blocks:
                if self._ref[b] <= 0:
                    raise AssertionError(f"fork of unreferenced block {b}")
                self._ref[b] += 1
            return BlockTable(list(table.blocks), table.num_tokens, list(table.hashes))

    def free(self, table: BlockTable) -> None:
        """Drop the table's references; blocks whose last reference goes become free or cached."""
        with self._lock:
            # Release from the tail so a later prefix match finds the head blocks warmest in LRU order.
            for b in reversed(table.blocks):
                self._release(b)
            table.blocks = []
            table.num_tokens = 0
            table.hashes = []

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` tokens of ``table``, freeing blocks past them."""
        with self._lock:
            if num_tokens < 0 or num_tokens > table.num_tokens:
                raise ValueError(f"cannot truncate {table.num_tokens} tokens to {num_tokens}")
            keep = -(-num_tokens // self.block_size)
            for b in reversed(table.blocks[keep:]):
                self._release(b)
            table.blocks = table.blocks[:keep]  # a new list: see BlockTable
            del table.hashes[num_tokens // self.block_size:]
            table.num_tokens = num_tokens
            # A published block that is partial again will be written into: unless it is shared (then
            # the next append copies it), take it out of the prefix index first.
            if num_tokens % self.block_size and self._ref[table.blocks[-1]] == 1:
                self._unpublish(table.blocks[-1])

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, token_ids: Sequence[int], max_tokens: int | None = None,
                     salt: int | None = None, known: list[bytes] | None = None, count: bool = True) -> BlockTable:
        """A table holding the longest cached run of full blocks that starts ``token_ids``.

        The returned blocks are referenced by the new table. ``max_tokens`` caps the match (an
        engine must leave at least one token to compute). ``salt`` names what else the K/V depends on
        (a LoRA adapter's id): blocks are only shared between lookups and publishes of one salt.
        ``known``: the chain hashes of the leading full blocks of ``token_ids`` under ``salt`` computed by an
        earlier call (a sequence's own list; the tokens only ever grow): they are taken from there, and the
        ones computed here are appended to it. A request that waits for memory retries every step.
        ``count=False`` leaves the hit-rate counters alone (the caller counts the lookup with
        :meth:`count_prefix` once the request is admitted).
        """
        with self._lock:
            table = BlockTable()
            if not self.enable_prefix_caching:
                return table
            bs = self.block_size
            limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
            parent = _root(salt)
            if count:
                self.prefix_queries += limit // bs  # every full block that could have been reused
            for i in range(limit // bs):
                chunk = tuple(token_ids[i * bs:(i + 1) * bs])
                h = _link(known, i, parent, chunk)
                b = self._by_hash.get(h)
                # Compare the tokens too: a hash collision must never return someone else's K/V.
                if b is None or self._tokens[b] != chunk or self._salt[b] != salt:
                    break
                self.prefix_hits += count
                if self._ref[b] == 0:
                    del self._evictable[b]
                self._ref[b] += 1
                table.blocks.append(b)
                table.hashes.append(h)
                parent = h
            table.num_tokens = len(table.blocks) * bs
            return table

    def publish(self, table: BlockTable, token_ids: Sequence[int], salt: int | None = None,
                known: list[bytes] | None = None) -> None:
        """Publish the table's full blocks (whose K/V are written) under their chain hashes.

        ``token_ids`` are the sequence's tokens; only the first ``table.num_tokens`` count; ``salt`` and
        ``known`` as in :meth:`match_prefix` (each block of a sequence is then hashed once, preemptions too).
        """
        bs = self.block_size
        full = min(table.num_tokens, len(token_ids)) // bs
        if not self.enable_prefix_caching or full <= len(table.hashes):
            return  # the decode step's usual case: no block filled up (a table is its owner's alone)
        with self._lock:
            parent = table.hashes[-1] if table.hashes else _root(salt)
            for i in range(len(table.hashes), full):
                chunk = tuple(token_ids[i * bs:(i + 1) * bs])
                h = _link(known, i, parent, chunk)
                b = table.blocks[i]
                if self._hash[b] is None and h not in self._by_hash:
                    self._hash[b] = h
                    self._tokens[b] = chunk
                    self._salt[b] = salt
                    self._by_hash[h] = b
                table.hashes.append(h)
                parent = h

    def count_prefix(self, queries: int, hits: int) -> None:
        """Count a lookup made with ``count=False``: ``queries`` full blocks looked up, ``hits`` found."""
        with self._lock:
            self.prefix_queries += queries
            self.prefix_hits += hits

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def reset_prefix_cache(self) -> None:
        """Forget every published prefix (unreferenced cached blocks become plain free blocks)."""
        with self._lock:
            for b in list(self._evictable):
                self._unpublish(b)
                self._free.append(b)
            self._evictable.clear()
            for b in list(self._by_hash.values()):
                self._unpublish(b)

    # ------------------------------------------------------------------ invariants
    def check(self, tables: Iterable[BlockTable] | None = None) -> None:
        """Assert every invariant; with ``tables`` (all live tables), also that refcounts match them."""
        with self._lock:
            free = list(self._free)
            assert len(set(free)) == len(free), "a block is twice in the free list"
            free_set, evict_set = set(free), set(self._evictable)
            assert not free_set & evict_set, "a block is both free and cached-evictable"
            for b in range(self.num_blocks):
                ref = self._ref[b]
                assert ref >= 0, f"block {b} has refcount {ref}"
                unreferenced = b in free_set or b in evict_set
                assert (ref == 0) == unreferenced, f"block {b}: refcount {ref}, free={unreferenced}"
                if b in free_set:
                    assert self._hash[b] is None, f"free block {b} still holds a prefix hash"
                if b in evict_set:
                    assert self._hash[b] is not None, f"evictable block {b} holds no prefix hash"
            for h, b in self._by_hash.items():
                assert self._hash[b] == h, f"prefix index points at block {b} with another hash"
            for b in range(self.num_blocks):
                if self._hash[b] is not None:
                    assert self._by_hash.get(self._hash[b]) == b, f"cached block {b} not in the index"
            if tables is not None:
                counts = [0] * self.num_blocks
                for t in tables:
                    assert len(t.blocks) == -(-t.num_tokens // self.block_size), "table size mismatch"
                    for b in t.blocks:
                        counts[b] += 1
                assert counts == self._ref, "refcounts do not match the live block tables"
