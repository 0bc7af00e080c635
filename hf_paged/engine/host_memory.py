"""Keep large host allocations in the heap (glibc), so the engine's per-step tensors reuse memory.

Each CPU step allocates tensors of tens of MB (the logits of 256 rows over a 49k vocabulary are
50 MB). glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap``
and returns it with ``munmap`` when freed: every step then page-faults the whole tensor in and unmaps
it again. On a 2-core machine that was about half of a 256-sequence decode step of a tiny model
(benchmarks/host_overhead.py: 34 ms -> 18 ms per step, host time 10.3 -> 5.2 ms). With mmap off for
``malloc`` and a high trim threshold, freed blocks stay in the heap and the next step reuses them,
as tcmalloc or jemalloc would. The cost: memory freed after a peak is kept by the process (resident
memory stays at its high-water mark instead of shrinking).

``HF_PAGED_MALLOC_TUNING=0`` leaves glibc's defaults; nothing changes off glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger("hf_paged")

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done: bool | None = None


def tune_malloc() -> bool:
    """Apply the settings once per process; True when glibc took them."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("HF_PAGED_MALLOC_TUNING", "1").strip() in ("0", "false", "off", "no"):
        logger.info("hf_paged: glibc malloc left at its defaults (HF_PAGED_MALLOC_TUNING=0)")
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _done = bool(ok)
    logger.info("hf_paged: glibc malloc keeps large blocks in the heap: %s", "on" if ok else "refused")
    return _done
