"""Sequence: one generated continuation of a request, as the scheduler and runner see it."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..kv.blocks import BlockTable

if TYPE_CHECKING:  # the scheduler and this file stay free of torch at run time
    import torch

    from .outputs import FinishReason
    from .params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)computation of its tokens
    RUNNING = "running"  # holds blocks; gets tokens computed every step
    FORKING = "forking"  # a sibling waiting for its parent's prompt, whose blocks it will share
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Token ids (prompt then output), the blocks that hold their K/V and how many are computed.

    Invariant while running: ``num_computed <= len(token_ids) + num_ahead``; the tokens past
    ``num_computed`` are the next ones to feed (a prompt chunk, or the single last sampled token when
    decoding, which under async scheduling may still be on its way: ``num_ahead``).
    """

    seq_id: int
    token_ids: list[int]
    num_prompt: int
    params: SamplingParams
    index: int = 0  # which of the request's num_return_sequences
    table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None  # of a seeded request: the same tokens in any batch
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Siblings (num_return_sequences) waiting for this sequence's prompt, whose blocks they will share.
    children: list["Sequence"] = field(default_factory=list)
    matcher: Any = None  # xgrammar GrammarMatcher of a constrained sequence (its own, siblings too)
    # With params.prompt_logprobs: (logprob, top alternatives) of prompt tokens 1.. as they are computed.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    adapter: Any = None  # the hf_paged.lora.Adapter this sequence runs (None: the base model)
    # Async scheduling: tokens sampled by launched steps that are not in token_ids yet (0 or 1, 2 for a
    # moment), and the row of the latest such step's sampled ids that holds this sequence's token.
    num_ahead: int = 0
    ahead_row: int = -1
    # Chain hashes of its leading full blocks as the prefix cache looked them up (match_prefix's ``known``):
    # computed once, though a sequence waiting for memory looks its prompt up again every step.
    block_hashes: list[bytes] = field(default_factory=list)

    @property
    def cache_salt(self) -> int | None:
        """What besides the tokens its K/V depends on (the adapter), for the prefix cache."""
        return None if self.adapter is None else self.adapter.uid

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V still have to be computed (a token still being sampled counts)."""
        return len(self.token_ids) + self.num_ahead - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
