"""Runner: turns a Schedule into one flat forward of the HF model and returns next-token logits.

All scheduled tokens are packed into a single row ``[1, T]`` with per-token ``position_ids``; the
attention layers find each sequence's K/V through the ``paged_metadata`` kwarg. Only the rows whose
logits are needed (the last token of each sequence that samples) go through the LM head.
"""
from __future__ import annotations

import inspect

import torch

from ..kv.metadata import PagedMetadata
from ..kv.pool import KVPool
from .scheduler import Schedule


class Runner:
    def __init__(self, model: torch.nn.Module, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        self.device = model.get_input_embeddings().weight.device
        params = inspect.signature(type(model).forward).parameters
        self._logits_to_keep = "logits_to_keep" in params

    @torch.inference_mode()
    def run(self, schedule: Schedule, every_position: list[bool] | None = None) -> torch.Tensor:
        """Logits (float32) of the last token of each sampling sequence, in schedule order; for a
        scheduled sequence with ``every_position[i]``, of every token of its chunk instead (its last
        row is then its sampling row, if it samples)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        for i, s in enumerate(schedule.seqs):
            end = s.start + s.num_tokens
            ids.extend(s.seq.token_ids[s.start:end])
            positions.extend(range(s.start, end))
            slots.extend(s.slots)
            if every_position is not None and every_position[i]:
                keep.extend(range(len(ids) - s.num_tokens, len(ids)))
            elif s.samples:
                keep.append(len(ids) - 1)
        self.pool.copy_blocks(schedule.copies)
        meta = PagedMetadata.build(
            self.pool, slots, [s.seq.table.blocks for s in schedule.seqs],
            [s.num_tokens for s in schedule.seqs], [s.start + s.num_tokens for s in schedule.seqs], None)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        position_ids = torch.tensor(positions, dtype=torch.long, device=self.device)[None]
        kwargs = {}
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep_t
        out = self.model(input_ids=input_ids, position_ids=position_ids, paged_metadata=meta,
                         use_cache=False, **kwargs)
        logits = out.logits[0]
        if not self._logits_to_keep:
            logits = logits.index_select(0, keep_t)
        return logits.float()
