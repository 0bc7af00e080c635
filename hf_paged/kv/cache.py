"""PagedKVCache: a transformers ``Cache`` whose K/V live in the blocks of a shared :class:`KVPool`.

Each batch row owns a :class:`BlockTable`. Before every forward, :meth:`PagedKVCache.plan` reserves
slots for the row's real new tokens (left padding is never stored) and returns the
:class:`PagedMetadata` that the attention hook uses to write and read K/V. Rows with identical
prompts (``num_return_sequences``) share their prompt blocks; beams fork and reorder block tables
instead of copying tensors; a shared, partially filled block is copied only when written.

Example::

    cache = PagedKVCache(pool)
    out = model.generate(**batch, past_key_values=cache)   # wrap() does this for you
    cache.release()                                        # blocks back to the pool
"""
from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .blocks import BlockAllocator, BlockTable, KVCacheFullError
from .metadata import PagedMetadata
from .pool import KVPool


class _PagedLayer(CacheLayerMixin):
    """Per-layer view for transformers; storage is the pool's, written by the attention hook."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, owner: "PagedKVCache") -> None:
        super().__init__()
        self._owner = weakref.proxy(owner)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # storage is preallocated
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # New K/V go to the attention hook unchanged: it stores them in their slots and reads the
        # rest of the sequence from the blocks, so no concatenated copy is ever built.
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self._owner.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        return None


def _release_tables(allocator: BlockAllocator, tables: list[BlockTable]) -> None:
    for t in tables:
        allocator.free(t)
    tables.clear()


class PagedKVCache(Cache):
    """A batch's KV cache, paged into a :class:`KVPool` shared with every other cache of the model."""

    def __init__(self, pool: KVPool) -> None:
        super().__init__(layers=[_PagedLayer(self) for _ in pool.layers])
        self.pool = pool
        self.allocator = pool.allocator
        # Mutated in place only: the finalizer below holds this very list.
        self.tables: list[BlockTable] = []
        self._seen = 0  # columns processed so far, padding included (what transformers calls length)
        self._pending = 0  # columns of the forward in flight
        self._before: list[int] | None = None  # row lengths before the forward in flight
        self._finalizer = weakref.finalize(self, _release_tables, self.allocator, self.tables)

    # ------------------------------------------------------------------ planning
    def plan(self, batch_size: int, q_len: int, new_mask: torch.Tensor | None = None,
             input_ids: torch.Tensor | None = None) -> PagedMetadata:
        """Reserve slots for the next forward of ``[batch_size, q_len]`` tokens.

        ``new_mask`` ``[B, q]`` marks real tokens (False = padding, not stored). On the first forward,
        rows whose ``input_ids`` equal an earlier row's share that row's blocks.
        """
        self._settle()
        if not self.tables:
            self.tables.extend(BlockTable() for _ in range(batch_size))
        elif len(self.tables) != batch_size:
            raise ValueError(f"cache holds {len(self.tables)} rows but the input has {batch_size}")
        self._before = [t.num_tokens for t in self.tables]
        if new_mask is not None:
            new_mask = new_mask.to("cpu", torch.bool)
            counts = new_mask.sum(1).tolist()
            all_real = all(c == q_len for c in counts)
        else:
            counts, all_real = [q_len] * batch_size, True
        twin = self._find_twins(input_ids, new_mask) if self._seen == 0 and input_ids is not None else {}
        need = sum(self.allocator.blocks_needed(t, c) for i, (t, c) in enumerate(zip(self.tables, counts))
                   if i not in twin)
        if need > self.allocator.num_free:
            raise KVCacheFullError(
                f"KV cache full: this step needs {need} blocks of {self.pool.block_size} tokens, "
                f"{self.allocator.num_free} of {self.pool.num_blocks} are free. Give wrap() a larger "
                "kv_memory or num_blocks, or generate fewer/shorter sequences at once.")
        slots: list[int] = []
        copies: list[tuple[int, int]] = []
        for i, table in enumerate(self.tables):
            if i in twin:
                self.allocator.free(table)
                self.tables[i] = self.allocator.fork(self.tables[twin[i]])
                row = [-1] * counts[i]
            else:
                row, cow = self.allocator.append_slots(table, counts[i])
                copies.extend(cow)
            if all_real:
                slots.extend(row)
            else:
                it = iter(row)
                slots.extend(next(it) if m else -1 for m in new_mask[i].tolist())
        self.pool.copy_blocks(copies)
        token_index = None
        if not all_real:
            flat = new_mask.reshape(-1).nonzero().squeeze(1)
            token_index = flat.tolist()
        self._pending = q_len
        return PagedMetadata.build(
            self.pool, slots, [t.blocks for t in self.tables], counts,
            [t.num_tokens for t in self.tables], token_index)

    @staticmethod
    def _find_twins(input_ids: torch.Tensor, new_mask: torch.Tensor | None) -> dict[int, int]:
        """Row -> earlier identical row (same tokens, same padding)."""
        rows = input_ids.detach().to("cpu")
        if new_mask is not None:
            rows = torch.where(new_mask, rows, -1)
        first: dict[tuple[int, ...], int] = {}
        twin: dict[int, int] = {}
        for i, r in enumerate(rows.tolist()):
            key = tuple(r)
            if key in first:
                twin[i] = first[key]
            else:
                first[key] = i
        return twin

    def _settle(self) -> None:
        """Before a new forward (or a crop): a forward whose end was never seen (an interrupt skips forward
        hooks, so ``end_step`` or ``rollback`` never ran) is rolled back; its K/V may be half written."""
        if self._before is not None:
            self.rollback()
        self.end_step()

    def end_step(self) -> None:
        """Account the columns of the forward that just ran."""
        self._seen += self._pending
        self._pending = 0
        self._before = None

    def rollback(self) -> None:
        """Forget the forward in flight (it failed): rows go back to their lengths before it."""
        if self._before is not None:
            for t, n in zip(self.tables, self._before):
                self.allocator.truncate(t, n)
        self._pending = 0
        self._before = None

    # ------------------------------------------------------------------ transformers Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seen + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    def _replace_rows(self, new: list[BlockTable]) -> None:
        old = list(self.tables)
        self.tables[:] = new
        for t in old:
            self.allocator.free(t)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues beam ``beam_idx[i]``; blocks are shared, not copied."""
        self._replace_rows([self.allocator.fork(self.tables[i]) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._replace_rows([self.allocator.fork(t) for t in self.tables for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._replace_rows([self.allocator.fork(self.tables[i]) for i in indices.tolist()])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` columns; 0 drops nothing (generate() calls ``crop(0)`` and
        ``crop(-0)``); a positive value is transformers' older meaning, the length to keep."""
        self._settle()
        drop = -tokens_to_remove if tokens_to_remove <= 0 else self._seen - tokens_to_remove
        if drop <= 0:
            return
        for t in self.tables:
            self.allocator.truncate(t, max(t.num_tokens - drop, 0))
        self._seen -= drop

    def reset(self) -> None:
        self.release()

    def release(self) -> None:
        """Return every block to the pool; the cache can then start a new batch."""
        _release_tables(self.allocator, self.tables)
        self._seen = self._pending = 0

    @property
    def num_blocks_held(self) -> int:
        return len({b for t in self.tables for b in t.blocks})


__all__ = ["PagedKVCache", "KVCacheFullError"]
