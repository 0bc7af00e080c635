"""The compiled CPU backend: decode rows in C++ (``csrc/paged_attention_cpu.cpp``), prefill rows in torch.

The C++ op reads K/V blocks in place through the block table, once, for all heads of a GQA group;
the torch path (``reference.py``) gathers blocks into a dense copy first and reads the context three
times. Decode dominates a serving step and is memory-bound, so that difference is the step time.
Prefill rows stay on ``reference``'s batched SDPA, whose matrix products are faster on CPU than a
per-token loop.

The extension is built on first use with ``torch.utils.cpp_extension`` (gcc/clang and ninja; about
half a minute, once) and cached in torch's extensions folder (``TORCH_EXTENSIONS_DIR``); the cache key
includes this CPU's instruction-set flags, since the code is built for the host (``-march=native``).
``available()`` says whether it loaded; ``HF_PAGED_CPU_KERNEL=0`` disables it, so ``auto`` falls back
to the torch path. A failed build is logged once and never retried in that process.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from . import reference

logger = logging.getLogger(__name__)

LORA_MAX_RANK = 256  # the C++ LoRA kernel's largest rank (csrc/lora_cpu.cpp keeps a row's rank in registers)
_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("paged_attention_cpu.cpp", "linear_cpu.cpp",
                                                                       "rms_norm_cpu.cpp", "lora_cpu.cpp",
                                                                       "linear_bf16_cpu.cpp", "argmax_cpu.cpp",
                                                                       "topk_cpu.cpp", "sample_cpu.cpp")]
_lock = threading.Lock()
_state: dict[str, object] = {}


def _host_key() -> str:
    """A short digest of what the host-tuned build depends on: CPU flags, compiler-visible arch, torch."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    headers = sorted(_SOURCES[0].parent.glob("*.h"))
    text = "|".join([flags, platform.machine(), torch.__version__, *(src.read_text() for src in _SOURCES + headers)])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _build() -> None:
    from torch.utils import cpp_extension

    name = f"hf_paged_cpu_{_host_key()}"
    verbose = os.environ.get("HF_PAGED_CPU_KERNEL_VERBOSE") == "1"
    march = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    with _build_lock(cpp_extension._get_build_directory(name, verbose)):
        cpp_extension.load(name=name, sources=[str(src) for src in _SOURCES], extra_cflags=["-O3", "-fopenmp", *march],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)


@contextlib.contextmanager
def _build_lock(build_dir: str) -> Iterator[None]:
    """Hold an flock next to the build folder while torch builds or loads the extension. Torch's own lock there
    is a plain file removed only when its builder ends normally: a process killed mid-build (SIGTERM from a
    service manager, the OOM killer) leaves it, and every later start then waits on it forever. The kernel
    releases an flock with its process, so whoever holds this one knows any torch lock left is stale."""
    import fcntl

    with open(build_dir.rstrip(os.sep) + ".hf_paged.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = os.path.join(build_dir, "lock")
            if os.path.exists(stale):
                logger.warning("hf_paged: removing %s, left by a build that was killed", stale)
                os.remove(stale)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def available() -> bool:
    """Whether the compiled op is usable here (builds it on the first call)."""
    if os.environ.get("HF_PAGED_CPU_KERNEL", "1").strip() == "0":
        return False
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            try:
                _build()
                _register_fakes()
                _state["ok"] = True
            except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, ...: the torch path still works
                _state["ok"] = False
                _state["error"] = exc
                logger.warning("hf_paged: the C++ CPU attention kernel could not be built (%s); using the "
                               "slower pure-torch path. Install a C++ compiler and ninja to enable it.", exc)
    return bool(_state["ok"])


def _register_fakes() -> None:
    """Shape-only ("fake") versions of the ops, so torch.compile can trace a forward that calls them
    (EngineConfig.compile): each says what its real op returns without computing it."""
    lib = "hf_paged_cpu::"

    def linear(x, weight, bias=None, *_):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def same(x, *_):
        return x.new_empty(x.shape)  # contiguous, as the ops return it (even for a strided input)

    def nothing(*_):
        return None

    for name, fake in (("skinny_linear", linear), ("skinny_linear_bf16", linear), ("rms_norm", same),
                       ("rms_norm_bf16", same), ("write_kv", nothing), ("paged_decode", nothing),
                       ("lora_sgmv", nothing),
                       ("argmax_rows", lambda scores: scores.new_empty(scores.shape[0], dtype=torch.long)),
                       ("argmax_logprob_rows", lambda scores: (scores.new_empty(scores.shape[0], dtype=torch.long),
                                                               scores.new_empty(scores.shape[0]))),
                       ("head_argmax", lambda x, weight, bias, vocab, logprob: (
                           x.new_empty(x.shape[0], dtype=torch.long), x.new_empty(x.shape[0] if logprob else 0))),
                       ("topk_rows", lambda scores, k: (scores.new_empty(scores.shape[0], k),
                                                        scores.new_empty(scores.shape[0], k, dtype=torch.long))),
                       ("sort_rows", lambda scores: (scores.new_empty(scores.shape),
                                                     scores.new_empty(scores.shape, dtype=torch.long),
                                                     scores.new_empty(scores.shape[0], dtype=torch.bool))),
                       ("cut_below", lambda scores, thr: scores.new_empty(scores.shape)),
                       ("cdf_draw", lambda probs, u: probs.new_empty(probs.shape[0], dtype=torch.long)),
                       ("nucleus_bins", lambda scores, best, lse, *_: (
                           scores.new_empty(scores.shape[0], dtype=torch.bool), scores.new_empty(scores.shape[0]))),
                       ("max_sum_exp", lambda scores: (scores.new_empty(scores.shape[0]),
                                                       scores.new_empty(scores.shape[0], dtype=torch.float64)))):
        torch.library.register_fake(lib + name)(fake)


def build_error() -> BaseException | None:
    """Why ``available()`` is False after a failed build (None otherwise)."""
    err = _state.get("error")
    return err if isinstance(err, BaseException) else None


def _index(t: torch.Tensor) -> torch.Tensor:
    return t if (t.dtype == torch.int32 and t.device.type == "cpu" and t.is_contiguous()) else \
        t.to(device="cpu", dtype=torch.int32).contiguous()


def paged_decode(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, *, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None) -> None:
    """Fill ``out``'s rows of every sequence with exactly one query; other rows are left as they are."""
    tables = block_tables if (block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1) else \
        block_tables.to(torch.int32).contiguous()
    q = query if query.stride(-1) == 1 else query.contiguous()
    torch.ops.hf_paged_cpu.paged_decode(
        q, k_cache, v_cache, _index(tables), _index(cu_seqlens_q), _index(seq_lens), out,
        float(scale), int(sliding_window or 0), float(softcap or 0.0))


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """``reference.write_kv`` in one C++ call: strided ``[T, KVH, D]`` rows, -1 slots skipped."""
    if not available():
        raise RuntimeError(f"the C++ CPU kernel is not available: {build_error() or 'disabled'}")
    if key.shape[0] == 0:
        return
    if key.dtype != k_cache.dtype:
        key, value = key.to(k_cache.dtype), value.to(k_cache.dtype)
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    slots = slot_mapping if slot_mapping.device.type == "cpu" and slot_mapping.is_contiguous() else \
        slot_mapping.to("cpu").contiguous()
    torch.ops.hf_paged_cpu.write_kv(key, value, k_cache, v_cache, slots)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Same contract as ``reference.paged_attention``; decode rows go through the C++ op."""
    if not available():
        raise RuntimeError(f"the C++ CPU kernel is not available: {build_error() or 'disabled'}")
    if query.stride(-1) != 1:  # the kernel reads and writes head_dim contiguously (the output is like the query)
        query = query.contiguous()

    def decode(out, rows=None):
        paged_decode(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale=scale,
                     sliding_window=sliding_window, softcap=softcap)
        return out

    if max_seqlen_q == 1 and query.shape[0] == seq_lens.shape[0] > 0:
        # A pure decode step (one query per sequence, no padding rows): the kernel writes every row,
        # so skip the host-side row analysis and the zero fill (this runs once per layer per step).
        return decode(torch.empty_like(query))
    return reference.paged_attention(
        query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=scale,
        sliding_window=sliding_window, softcap=softcap, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        decode_rows=decode, new_kv=new_kv,
    )


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a 2-D fp32 CPU input, by the C++ kernel (any row count; fastest for few rows)."""
    return torch.ops.hf_paged_cpu.skinny_linear(x, weight, bias)


def skinny_linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                       allow_dpbf16: bool = True) -> torch.Tensor:
    """``F.linear`` for a 2-D bf16 CPU input (fp32 accumulation), by the C++ kernel; ``allow_dpbf16=False``
    keeps it off the avx512_bf16 path (see :func:`bf16_linear_path`)."""
    return torch.ops.hf_paged_cpu.skinny_linear_bf16(x, weight, bias, allow_dpbf16)


def bf16_linear_path() -> str:
    """The instruction set the bf16 skinny kernel uses here: "avx512_bf16", "avx2" or "scalar"."""
    return torch.ops.hf_paged_cpu.skinny_linear_bf16_path()


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(-1)`` of a 2-D fp32 CPU tensor with unit-stride rows, rows split between threads."""
    return torch.ops.hf_paged_cpu.argmax_rows(scores)


def argmax_logprob_rows(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`argmax_rows` and ``log_softmax(scores, -1)`` at those ids (fp32; NaN where a row's maximum is
    not finite), without making the ``[rows, vocab]`` log-probabilities."""
    return torch.ops.hf_paged_cpu.argmax_logprob_rows(scores)


def head_argmax(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab: int,
                logprob: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output layer and the greedy pick fused: :func:`argmax_logprob_rows` (``logprob``) or
    :func:`argmax_rows` of ``F.linear(x, weight, bias)[:, :vocab]`` without making those ``[rows, vocab]``
    logits (fp32 CPU tensors). The log-probabilities are None without ``logprob``."""
    ids, lps = torch.ops.hf_paged_cpu.head_argmax(x, weight, bias, int(vocab), bool(logprob))
    return ids, (lps if logprob else None)


def topk_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=-1)`` of a 2-D fp32 CPU tensor with unit-stride rows: the same values, best
    first; equal scores in index order, the lower index kept at the boundary. Two passes a row, the second
    over the few segments that can hold a top-k score."""
    return torch.ops.hf_paged_cpu.topk_rows(scores, int(k))


def sort_rows(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.sort(scores, dim=-1, stable=True)`` of a 2-D fp32 CPU tensor with unit-stride rows (a radix sort,
    ~5x faster a row), and per row whether it was sorted: False for a row holding a NaN, returned unsorted
    (indices 0, 1, ...). Of -0.0 and +0.0, which torch ranks equal, -0.0 comes first."""
    return torch.ops.hf_paged_cpu.sort_rows(scores)


def cut_below(scores: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """``scores.masked_fill(scores < thr.view(-1, 1), -inf)`` of 2-D fp32 CPU rows, in one pass (a new tensor)."""
    return torch.ops.hf_paged_cpu.cut_below(scores, thr)


def cdf_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each row's inverse-CDF pick from fp32 probabilities and a float64 uniform ``u`` [rows]: where
    ``searchsorted`` finds ``u * total`` on ``probs.cumsum(-1)`` (float32, as torch sums it on CPU), capped at
    the first prefix reaching the total; -1 for a row whose total is NaN. Fast where most probabilities are 0."""
    return torch.ops.hf_paged_cpu.cdf_draw(probs, u)


def nucleus_bins(scores: torch.Tensor, best: torch.Tensor, lse: torch.Tensor, top_p: float, margin: float, bins: int,
                 span: float, max_bin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``warpers._cut_by_bins``' decision (its method and margins, C++ float rounding) for fp32 rows: ``best``
    their float32 maxima, ``lse`` their float64 logsumexp. Per row whether it is decided, and its threshold."""
    return torch.ops.hf_paged_cpu.nucleus_bins(scores, best.reshape(-1), lse.reshape(-1), float(top_p), float(margin),
                                               int(bins), float(span), int(max_bin))


def max_sum_exp(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each fp32 row's maximum and its ``sum(exp(score - max))`` in float64 (NaN where the maximum is not finite)."""
    return torch.ops.hf_paged_cpu.max_sum_exp(scores)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """``(x * rsqrt(mean(x^2, -1) + eps)) * (weight + offset)`` for fp32 CPU tensors, in one C++ pass."""
    return torch.ops.hf_paged_cpu.rms_norm(x, weight, float(eps), float(offset))


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, *,
                  round_first: bool = True) -> torch.Tensor:
    """RMSNorm of bf16 CPU tensors in one C++ pass, fp32 inside: ``bf16((weight + offset) * bf16(x * r))``
    (``round_first``, the Llama family) or ``bf16(x * r * (weight + offset))`` (Gemma), r the inverse RMS."""
    return torch.ops.hf_paged_cpu.rms_norm_bf16(x, weight, float(eps), float(offset), bool(round_first))


def lora_sgmv(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, ranks: torch.Tensor,
              scales: torch.Tensor, token_slot: torch.Tensor) -> None:
    """In place, fp32: ``out[t] += scales[s] * (a[s, :r] @ x[t]) @ bt[s, :r]`` for each token ``t`` of slot
    ``s = token_slot[t]`` (-1: none) of rank ``r = ranks[s]``; one C++ call for all adapters."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    a, bt, ranks, scales, token_slot = (t.contiguous() for t in (a, bt, ranks, scales, token_slot))
    torch.ops.hf_paged_cpu.lora_sgmv(out, x, a, bt, ranks, scales, token_slot)
