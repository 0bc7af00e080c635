"""Runner: turns a Schedule into one flat forward of the HF model and returns next-token logits.

All scheduled tokens are packed into a single row ``[1, T]`` with per-token ``position_ids``; the
attention layers find each sequence's K/V through the ``paged_metadata`` kwarg. Only the rows whose
logits are needed (the last token of each sequence that samples) go through the LM head.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch

from ..kv.metadata import PagedMetadata
from ..lora.layers import LoraBatch
from ..kv.pool import KVPool
from .scheduler import Schedule


class Runner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, adapters: Any = None) -> None:
        self.model = model
        self.pool = pool
        self.adapters = adapters  # hf_paged.lora.AdapterSet, or None
        self.device = model.get_input_embeddings().weight.device
        params = inspect.signature(type(model).forward).parameters
        self._logits_to_keep = "logits_to_keep" in params

    @torch.inference_mode()
    def run(self, schedule: Schedule, every_position: list[bool] | None = None) -> torch.Tensor:
        """Logits (float32) of the last token of each sampling sequence, in schedule order; for a
        scheduled sequence with ``every_position[i]``, of every token of its chunk instead (its last
        row is then its sampling row, if it samples).

        With LoRA layers in the model, tokens are packed grouped by adapter (base model first), so each
        adapter's tokens are one contiguous run for the batched LoRA op; the logits stay in schedule order.
        """
        seqs = schedule.seqs
        lora = self.adapters is not None and self.adapters.has_layers
        order = range(len(seqs))
        if lora:
            order = sorted(order, key=lambda i: -1 if seqs[i].seq.adapter is None else seqs[i].seq.adapter.slot)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        offsets = [0] * len(seqs)
        for i in order:
            s = seqs[i]
            offsets[i] = len(ids)
            end = s.start + s.num_tokens
            ids.extend(s.seq.token_ids[s.start:end])
            positions.extend(range(s.start, end))
            slots.extend(s.slots)
        keep: list[int] = []
        for i, s in enumerate(seqs):
            if every_position is not None and every_position[i]:
                keep.extend(range(offsets[i], offsets[i] + s.num_tokens))
            elif s.samples:
                keep.append(offsets[i] + s.num_tokens - 1)
        packed = [seqs[i] for i in order]
        self.pool.copy_blocks(schedule.copies)
        meta = PagedMetadata.build(
            self.pool, slots, [s.seq.table.blocks for s in packed],
            [s.num_tokens for s in packed], [s.start + s.num_tokens for s in packed], None)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        position_ids = torch.tensor(positions, dtype=torch.long, device=self.device)[None]
        kwargs = {}
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep_t
        with contextlib.ExitStack() as stack:
            if lora:
                batch = LoraBatch.build([None if s.seq.adapter is None else s.seq.adapter.slot for s in packed],
                                        [s.num_tokens for s in packed], self.device)
                stack.enter_context(self.adapters.active(batch))
            out = self.model(input_ids=input_ids, position_ids=position_ids, paged_metadata=meta,
                             use_cache=False, **kwargs)
        logits = out.logits[0]
        if not self._logits_to_keep:
            logits = logits.index_select(0, keep_t)
        return logits.float()
