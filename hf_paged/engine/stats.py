"""EngineStats: what the engine reports about itself (the UI, ``/metrics`` and ``/engine/stats`` read it).

Blocks are counted one way everywhere: ``used`` (referenced by a sequence) + ``cached`` (unreferenced,
holding a prefix, evicted on demand) + ``free`` (holding nothing) = ``total``.

Example::

    s = pipe.stats()
    s.blocks_used, s.tokens_per_s       # attributes
    s["blocks_used"], s.as_dict()       # and as a mapping, for JSON and older callers
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class EngineStats:
    running: int  # sequences in the running batch
    waiting: int  # sequences queued (new or preempted)
    blocks_total: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    prefix_hit_rate: float  # fraction of probed full prompt blocks found in the prefix cache
    preemptions: int
    tokens_generated: int
    tokens_per_s: float  # over the last few seconds; 0 when idle
    steps: int
    # How decode steps run: "cuda_graphs" (captured; larger and mixed steps eager), "compiled" (CPU
    # torch.compile), "static" (static buffers run eagerly, tests) or "eager"; a failed capture or
    # compile leaves "eager", which an operator should see.
    decode_path: str = "eager"
    graph_steps: int = 0  # decode steps served by the graph runner (graphs, compiled forward or static buffers)

    @property
    def blocks_allocatable(self) -> int:
        return self.blocks_free + self.blocks_cached

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "blocks_allocatable": self.blocks_allocatable}

    def __getitem__(self, key: str) -> Any:
        if key == "blocks_allocatable":
            return self.blocks_allocatable
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None
