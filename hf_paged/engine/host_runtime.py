"""Host runtime settings for the CPU engine: glibc's malloc (``tune_malloc``) and OpenMP's thread
pools (``release_openmp_pool``).

**malloc.** Keep large host allocations in the heap (glibc), so the engine's per-step tensors reuse memory.

Each CPU step allocates tensors of tens of MB (the logits of 256 rows over a 49k vocabulary are
50 MB). glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap``
and returns it with ``munmap`` when freed: every step then page-faults the whole tensor in and unmaps
it again. On a 2-core machine that was about half of a 256-sequence decode step of a tiny model
(benchmarks/host_overhead.py: 34 ms -> 18 ms per step, host time 10.3 -> 5.2 ms). With mmap off for
``malloc`` and a high trim threshold, freed blocks stay in the heap and the next step reuses them,
as tcmalloc or jemalloc would. The cost: memory freed after a peak is kept by the process (resident
memory stays at its high-water mark instead of shrinking).

``HF_PAGED_MALLOC_TUNING=0`` leaves glibc's defaults; nothing changes off glibc.

**OpenMP.** The engine's forward runs on its own thread, so its parallel regions get their own libgomp
team, while the thread that loaded the model keeps an idle team of its own. With more OpenMP threads
than cores, libgomp throttles its spin-waiting, and every parallel region then waits on a sleeping
worker: a bf16 decode step of the default model took 41 ms on the engine thread against 26 ms on the
main thread (single stream; the C++ bf16 kernel alone 8.8 vs 5.8 ms). ``omp_pause_resource_all``,
called by the thread that owns the idle team (the one creating the pipeline), releases it; libgomp
builds it again if that thread runs parallel work later. ``HF_PAGED_OMP_RELEASE=0`` skips this.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
import threading

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


_gomp: object = None


def release_openmp_pool() -> bool:
    """Release the calling thread's idle OpenMP team (libgomp only); True when libgomp accepted."""
    if os.environ.get("HF_PAGED_OMP_RELEASE", "1").strip() in ("0", "false", "off", "no"):
        return False
    if threading.current_thread() is not threading.main_thread() and threading.current_thread().name.startswith(
            "hf_paged-engine"):
        return False  # the engine thread's own team is the one doing the work
    return _pause()


def park_openmp_workers() -> bool:
    """Put the engine thread's OpenMP workers to sleep until its next parallel region (called once a step's
    tokens are sampled): libgomp's workers otherwise spin-wait through the step's host work, a core each."""
    if os.environ.get("HF_PAGED_OMP_PARK", "1").strip() in ("0", "false", "off", "no"):
        return False
    return _pause()


def _pause() -> bool:
    global _gomp
    if _gomp is None:
        _gomp = False
        import torch

        found = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*")))
        try:
            lib = ctypes.CDLL(found[0]) if found else None
            if lib is not None:
                lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
                _gomp = lib
        except (OSError, AttributeError):
            pass
    if not _gomp:
        return False
    return _gomp.omp_pause_resource_all(1) == 0  # omp_pause_soft
