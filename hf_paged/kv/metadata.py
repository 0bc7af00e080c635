"""PagedMetadata: what one forward's attention layers need to find and store K/V in the pool.

It travels from the planner (the paged Cache, or the engine's runner) to every attention layer as the
``paged_metadata`` keyword argument; there is no global state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .pool import KVPool


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor ``t`` on ``device`` without making the host wait: on CUDA through pinned memory with a
    non-blocking copy (a copy from pageable memory may synchronize with the stream, and a blocking one,
    as ``torch.tensor(..., device=...)`` makes, always does: either would stall async scheduling until
    the step in flight finishes); elsewhere a plain ``to``."""
    if device.type == "cuda" and t.device.type == "cpu":
        if t.is_pinned():  # pin_memory() would return t itself, which the caller may overwrite before the copy
            pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            pinned.copy_(t)
        else:
            pinned = t.pin_memory()
        return pinned.to(device, non_blocking=True)
    return t.to(device)


def host_tensor(values: list[int], dtype: type = np.int64) -> torch.Tensor:
    """A CPU tensor of a list of ints, through numpy: ~3x faster than ``torch.tensor(list)`` at a few hundred."""
    return torch.from_numpy(np.array(values, dtype=dtype))


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as a long tensor on ``device`` (see :func:`to_device`)."""
    return to_device(torch.tensor(values, dtype=torch.long), device)


def column_tensor(values: list[float], device: torch.device) -> torch.Tensor:
    """``values`` as a float32 ``[n, 1]`` column on ``device``."""
    return to_device(torch.tensor(values, dtype=torch.float32).view(-1, 1), device)


def padded_tensor(lists: list[list[int]], device: torch.device, pad: int | None = None,
            dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Rows of unequal length as one tensor; ``pad`` None repeats each row's first value (a no-op for
    gather/scatter of the same value)."""
    width = max(len(x) for x in lists)
    return to_device(torch.tensor([x + [x[0] if pad is None else pad] * (width - len(x)) for x in lists], dtype=dtype),
               device)


class TableRows:
    """Block tables kept as rows of one persistent int32 array, so that a step's ``[S, width]`` table
    tensor is one gather instead of S Python lists converted anew (at 256 sequences of 1024 tokens that
    conversion took ~1 ms a step). A row is rewritten only when its table changed: a decoding sequence
    gains a block every ``block_size`` steps.

    Rows are keyed by the table's list object, held here so its id cannot be reused while cached, and by
    its length: a :class:`~hf_paged.kv.blocks.BlockTable`'s list only grows in place (a copy-on-write, a
    truncation or a free puts a new list there), so the same list at the same length holds the same blocks,
    and one that grew needs only its new entries written. That check reads no block of the table (comparing
    the contents read two cold lists a table, a third of this call's time at 256 tables of 64 blocks). Lists
    changed in any other way must not be passed. Unused rows are dropped all at once when the array fills
    up. Not thread-safe: one per runner.

    Example::

        rows = TableRows()
        bt = rows.gather([[3, 4], [9]], width=2)   # int32 [[3, 4], [9, 0]]
    """

    def __init__(self, capacity: int = 64, width: int = 8) -> None:
        self._arr = np.zeros((capacity, width), np.int32)
        self._entries: dict[int, tuple[list[int], int, int]] = {}  # id(table) -> (table, its length, row)
        self._used = 0  # rows handed out since the last reset
        self.longest = 0  # the longest table of the last indices() call

    def indices(self, tables: list[list[int]]) -> np.ndarray:
        """The row of each table (rows past a table's length hold 0), writing the tables that changed."""
        n = len(tables)
        self.longest = max(map(len, tables), default=0)
        self._widen(self.longest)
        if self._used + n > self._arr.shape[0]:
            # Full: forget every row (most belong to finished sequences) and start over, with room to spare.
            self._entries.clear()
            self._used = 0
            self._arr = np.zeros((max(self._arr.shape[0], 4 * n), self._arr.shape[1]), np.int32)
        arr, entries = self._arr, self._entries
        out = np.empty(n, np.int64)
        for i, t in enumerate(tables):
            e = entries.get(id(t))
            k = len(t)
            if e is not None and e[0] is t:
                row, old = e[2], e[1]
                if old == k:
                    out[i] = row
                    continue
                if old < k:  # grown in place: only the new blocks
                    arr[row, old:k] = t[old:]
                else:
                    arr[row, :k] = t
                    arr[row, k:old] = 0
            else:
                row = self._used
                self._used += 1
                arr[row, :k] = t
            entries[id(t)] = (t, k, row)
            out[i] = row
        return out

    def gather(self, tables: list[list[int]], width: int) -> np.ndarray:
        """``[len(tables), width]`` int32: each table padded with 0 (cut at ``width``)."""
        self._widen(width)
        idx = self.indices(tables)  # first: it may replace the array
        return self._arr[idx, :width]

    def _widen(self, need: int) -> None:
        if need > self._arr.shape[1]:
            wider = np.zeros((self._arr.shape[0], max(need, 2 * self._arr.shape[1])), np.int32)
            wider[:, : self._arr.shape[1]] = self._arr
            self._arr = wider

    def pack_into(self, tables: list[list[int]], flat: np.ndarray, max_width: int) -> int:
        """The tables' rows, cut at ``max_width`` and padded with 0 to the longest one's width ``w``, as one
        contiguous ``[len(tables), w]`` array at the start of the 1-D ``flat``; returns ``w`` (at least 1). So
        a step copies only what its tables use, not a CUDA graph's whole table width (8192 entries a row at
        a 128K-token context)."""
        idx = self.indices(tables)
        w = max(1, min(max_width, self.longest))
        np.take(self._arr[:, :w], idx, axis=0, out=flat[: len(tables) * w].reshape(len(tables), w))
        return w


@dataclass(slots=True)
class StepTensors:
    slot_mapping: torch.Tensor  # [N] int64: slot of each input token, -1 = not stored
    block_tables: torch.Tensor  # [S, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [S+1] int32: new (query) tokens of each sequence, packed
    seq_lens: torch.Tensor  # [S] int32: tokens of each sequence including the new ones
    token_index: torch.Tensor | None  # [T] int64: which of the N inputs are queries; None = all


@dataclass(slots=True)
class PagedMetadata:
    """Per-forward paged-attention inputs. The model input is ``[B, q]`` tokens flattened to ``N = B*q``.

    ``token_index`` selects the T real tokens (left padding and rows served by a shared copy are
    skipped) that are packed, sequence by sequence, into the queries of ``cu_seqlens_q``.
    """

    pool: KVPool
    host: StepTensors
    max_seqlen_q: int
    max_seqlen_k: int
    _by_device: dict = field(default_factory=dict)
    # A fresh prefill: no sequence has cached context (each seq_len equals its q_len) and no input is
    # skipped, so attention can read the layer's own contiguous K/V (kernels.varlen); q_lens on the host.
    fresh: bool = False
    q_lens: list[int] | None = None

    def on(self, device: torch.device) -> StepTensors:
        """The step tensors on ``device`` (moved once per device and forward)."""
        cached = self._by_device.get(device)
        if cached is None:
            h = self.host
            cached = StepTensors(*(None if t is None else to_device(t, device)
                                   for t in (h.slot_mapping, h.block_tables, h.cu_seqlens_q, h.seq_lens,
                                             h.token_index)))
            self._by_device[device] = cached
        return cached

    @classmethod
    def build(cls, pool: KVPool, slots: list[int], tables: list[list[int]], q_lens: list[int],
              seq_lens: list[int], token_index: list[int] | None, rows: TableRows | None = None) -> "PagedMetadata":
        """Pack host-side lists into tensors (on the pool's first device). ``rows``: where the block
        tables persist between calls (the engine's runner), else they are converted anew."""
        width = max(map(len, tables), default=0) or 1
        if rows is not None:
            bt = torch.from_numpy(rows.gather(tables, width))
        else:
            bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).view(-1, width)
        cu = np.zeros(len(q_lens) + 1, np.int32)
        np.cumsum(q_lens, out=cu[1:])
        host = StepTensors(
            slot_mapping=host_tensor(slots, np.int64),
            block_tables=bt,
            cu_seqlens_q=torch.from_numpy(cu),
            seq_lens=host_tensor(seq_lens, np.int32),
            token_index=None if token_index is None else host_tensor(token_index, np.int64),
        )
        meta = cls(pool, host, max(q_lens, default=0), max(seq_lens, default=0))
        if token_index is None and meta.max_seqlen_q > 1 and list(q_lens) == list(seq_lens):
            meta.fresh, meta.q_lens = True, list(q_lens)
        device = pool.layers[0].device
        if device.type != "cpu":
            meta.host = meta.on(device)
            meta._by_device[device] = meta.host
        return meta
