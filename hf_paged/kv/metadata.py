"""PagedMetadata: what one forward's attention layers need to find and store K/V in the pool.

It travels from the planner (the paged Cache, or the engine's runner) to every attention layer as the
``paged_metadata`` keyword argument; there is no global state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .pool import KVPool


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor ``t`` on ``device`` without making the host wait: on CUDA through pinned memory with a
    non-blocking copy (a copy from pageable memory may synchronize with the stream, and a blocking one,
    as ``torch.tensor(..., device=...)`` makes, always does: either would stall async scheduling until
    the step in flight finishes); elsewhere a plain ``to``."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
              seq_lens: list[int], token_index: list[int] | None) -> "PagedMetadata":
        """Pack host-side lists into tensors (on the pool's first device)."""
        width = max((len(t) for t in tables), default=0) or 1
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).view(-1, width)
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        host = StepTensors(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=bt,
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            token_index=None if token_index is None else torch.tensor(token_index, dtype=torch.int64),
        )
        meta = cls(pool, host, max(q_lens, default=0), max(seq_lens, default=0))
        if token_index is None and meta.max_seqlen_q > 1 and list(q_lens) == list(seq_lens):
            meta.fresh, meta.q_lens = True, list(q_lens)
        device = pool.layers[0].device
        if device.type != "cpu":
            meta.host = meta.on(device)
            meta._by_device[device] = meta.host
        return meta
