"""Cost of the prefix cache's chain hashes: publish and match_prefix of one long prompt, SHA-256 (this tree)
against Python's built-in ``hash`` chain (what the tree used before; insecure, kept here as the baseline),
in interleaved rounds in one process.

    python benchmarks/prefix_hash.py [--lengths 1024 8192 32768] [--rounds 5]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from contextlib import contextmanager

from hf_paged.kv import blocks


@contextmanager
def builtin_chain():
    """The old chain: ``hash((parent, tokens))`` from ``hash(("salt", salt))`` or None."""
    saved = blocks.chain_hash, blocks._root
    blocks.chain_hash = lambda parent, tokens: hash((parent, tuple(tokens)))
    blocks._root = lambda salt: None if salt is None else hash(("salt", salt))
    try:
        yield
    finally:
        blocks.chain_hash, blocks._root = saved


def once(tokens: list[int]) -> tuple[float, float]:
    n = len(tokens)
    alloc = blocks.BlockAllocator(n // 16 + 4, 16)
    table = blocks.BlockTable()
    alloc.append_slots(table, n)
    t0 = time.perf_counter()
    alloc.publish(table, tokens)
    t1 = time.perf_counter()
    hit = alloc.match_prefix(tokens)
    t2 = time.perf_counter()
    assert hit.num_tokens == n
    alloc.free(hit)
    alloc.free(table)
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(0)
    for n in args.lengths:
        tokens = [rng.randrange(49152) for _ in range(n)]
        got: dict[str, list[tuple[float, float]]] = {"sha256": [], "builtin": []}
        for r in range(args.rounds):
            for name in ("sha256", "builtin") if r % 2 == 0 else ("builtin", "sha256"):
                if name == "builtin":
                    with builtin_chain():
                        got[name].append(once(tokens))
                else:
                    got[name].append(once(tokens))
        for name, rows in got.items():
            pub, match = [p for p, _ in rows], [m for _, m in rows]
            print(f"{n} tokens, {name}: publish {' / '.join(f'{v:.2f}' for v in pub)} ms "
                  f"(median {statistics.median(pub):.2f}); match_prefix {' / '.join(f'{v:.2f}' for v in match)} ms "
                  f"(median {statistics.median(match):.2f})")


if __name__ == "__main__":
    main()
