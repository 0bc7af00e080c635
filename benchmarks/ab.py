"""Interleaved A/B rounds of ``PagedPipeline.generate`` in one process (shared by the benchmarks that switch
one path off and on)."""
from __future__ import annotations

import time
from collections.abc import Callable


def ab_generate(pipe, prompts, kw: dict, rounds: int,
                arms: dict[str, Callable[[], None]]) -> tuple[dict[str, list[float]], dict[str, list]]:
    """``rounds`` rounds of ``pipe.generate(prompts, **kw)`` under each arm (a callable that switches the
    process to it), the arms' order reversed every other round. Returns output tok/s per round by arm, and
    each arm's tokens (asserted the same in every round of that arm)."""
    names = list(arms)
    tps: dict[str, list[float]] = {name: [] for name in names}
    outs: dict[str, list] = {}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            arms[name]()
            t = time.perf_counter()
            res = pipe.generate(prompts, **kw)
            dt = time.perf_counter() - t
            toks = [x.token_ids for x in res]
            tps[name].append(sum(map(len, toks)) / dt)
            assert outs.setdefault(name, toks) == toks
    return tps, outs
