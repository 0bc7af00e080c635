"""The prefix cache's chain hashes: a full block's hash stands for its tokens and every token before it.

SHA-256, as vLLM's prefix cache since CVE-2025-25183. A block found under a hash is checked for its own tokens
and salt, but not for the tokens before it, which only the chain stands for. Python's ``hash`` of ints and tuples
is not randomised and is easy to invert, so a crafted prompt could collide with another user's chain and read or
plant K/V computed after someone else's text. ~2 us a block here (docs/benchmarks.md, twenty-first session).
"""
from __future__ import annotations

import functools
import hashlib
from array import array
from collections.abc import Sequence


@functools.lru_cache(maxsize=1024)
def _root(salt: int | None) -> bytes:
    """The parent hash of a chain's first block: chains of different salts never meet."""
    return hashlib.sha256(b"hf_paged prefix" if salt is None else b"hf_paged prefix, salt %d" % salt).digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Hash of a full block given the hash of the block before it; equal prefixes give equal chains."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()
