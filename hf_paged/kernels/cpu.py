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

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

from . import reference

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("paged_attention_cpu.cpp", "linear_cpu.cpp")]
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
    text = "|".join([flags, platform.machine(), torch.__version__, *(src.read_text() for src in _SOURCES)])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _build() -> None:
    from torch.utils import cpp_extension

    march = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    cpp_extension.load(
        name=f"hf_paged_cpu_{_host_key()}",
        sources=[str(src) for src in _SOURCES],
        extra_cflags=["-O3", "-fopenmp", *march],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=os.environ.get("HF_PAGED_CPU_KERNEL_VERBOSE") == "1",
    )


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
                _state["ok"] = True
            except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, ...: the torch path still works
                _state["ok"] = False
                _state["error"] = exc
                logger.warning("hf_paged: the C++ CPU attention kernel could not be built (%s); using the "
                               "slower pure-torch path. Install a C++ compiler and ninja to enable it.", exc)
    return bool(_state["ok"])


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
) -> torch.Tensor:
    """Same contract as ``reference.paged_attention``; decode rows go through the C++ op."""
    if not available():
        raise RuntimeError(f"the C++ CPU kernel is not available: {build_error() or 'disabled'}")

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
        decode_rows=decode,
    )


# ---------------------------------------------------------------------------------------- linear layers
# A decode step's matmuls are skinny ([rows, in] x [in, out] with 1-64 rows) and their weights stream
# from DRAM. Measured on this project's 2-core CPU (docs/benchmarks.md): up to SKINNY_MAX_ROWS rows,
# the C++ kernel in csrc/linear_cpu.cpp runs a full decode step's matmuls 1.1-1.7x faster than
# oneDNN; above that, oneDNN (torch.ops.mkldnn._linear_pointwise) runs the wide output layer (vocab
# 49152) 1.6-1.9x faster than the MKL path behind F.linear and the other projections about as fast.
# So wrap() routes a CPU fp32 model's nn.Linear layers through both (HF_PAGED_CPU_GEMM=0 turns the
# C++ kernel off, HF_PAGED_ONEDNN_LINEAR=0 keeps F.linear for the large calls). Results differ from
# F.linear only in summation order (~1e-6 relative), as the attention kernels' do; inference only:
# grad-enabled calls use F.linear.
SKINNY_MAX_ROWS = 48


def _skinny_enabled() -> bool:
    if os.environ.get("HF_PAGED_CPU_GEMM", "1").strip() == "0" or not available():
        return False
    return bool(torch.ops.hf_paged_cpu.skinny_linear_vectorized())


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a 2-D fp32 CPU input, by the C++ kernel (any row count; fastest for few rows)."""
    return torch.ops.hf_paged_cpu.skinny_linear(x, weight, bias)


def _cpu_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Runs ~200 times per decode step: parameters are read from _parameters directly (no
    # nn.Module.__getattr__ round trip).
    params = self._parameters
    weight, bias = params["weight"], params["bias"]
    if x.is_cpu and x.dtype == torch.float32 and not (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad)):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 0 < rows <= self._hf_paged_skinny_rows:
            y = torch.ops.hf_paged_cpu.skinny_linear(x.reshape(rows, x.shape[-1]), weight, bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        if rows > 0 and self._hf_paged_onednn:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), weight, bias, "none", [], "")
            return y.view(*x.shape[:-1], y.shape[-1])
    return torch.nn.functional.linear(x, weight, bias)


def install_cpu_linears(model: torch.nn.Module) -> int:
    """Route the CPU fp32 ``nn.Linear`` layers of ``model`` through the C++ skinny kernel (few rows)
    and oneDNN (more rows), where each is enabled; returns how many layers were rerouted."""
    onednn = os.environ.get("HF_PAGED_ONEDNN_LINEAR", "1").strip() != "0" and torch.backends.mkldnn.is_available()
    skinny_rows = None
    count = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if type(mod) is torch.nn.Linear and w.device.type == "cpu" and w.dtype == torch.float32 \
                and w.is_contiguous():
            if skinny_rows is None:
                skinny_rows = SKINNY_MAX_ROWS if _skinny_enabled() else 0
            if not onednn and not skinny_rows:
                return 0
            mod._hf_paged_skinny_rows = skinny_rows
            mod._hf_paged_onednn = onednn
            mod.forward = _cpu_linear_forward.__get__(mod)
            count += 1
    return count


def remove_cpu_linears(model: torch.nn.Module) -> None:
    for mod in model.modules():
        if type(mod) is torch.nn.Linear:
            for name in ("forward", "_hf_paged_skinny_rows", "_hf_paged_onednn"):
                mod.__dict__.pop(name, None)


# ---------------------------------------------------------------------------------------- RMSNorm
# transformers' RMSNorm modules run ~8 small ops per call (to, pow, mean, add, rsqrt, mul, to, mul),
# twice per layer and step: ~50 us each at decode sizes, against ~5 us for one fused C++ pass.
# A module is rerouted only if the fused op reproduces its own forward on a probe input (so
# variants with another formula are left alone); HF_PAGED_CPU_NORM=0 turns this off.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """``(x * rsqrt(mean(x^2, -1) + eps)) * (weight + offset)`` for fp32 CPU tensors, in one C++ pass."""
    return torch.ops.hf_paged_cpu.rms_norm(x, weight, float(eps), float(offset))


def _cpu_rms_norm_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = self._parameters["weight"]
    if x.is_cpu and x.dtype == torch.float32 and not (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad)):
        return torch.ops.hf_paged_cpu.rms_norm(x, weight, self._hf_paged_norm_eps, self._hf_paged_norm_offset)
    return type(self).forward(self, x)


def _norm_eps(mod: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(mod, name, None)
        if isinstance(eps, float):
            return eps
    return None


def install_cpu_norms(model: torch.nn.Module) -> int:
    """Route the CPU fp32 RMSNorm modules of ``model`` through the fused C++ op; returns how many."""
    if os.environ.get("HF_PAGED_CPU_NORM", "1").strip() == "0":
        return 0
    count = 0
    probe = None
    for mod in model.modules():
        if not type(mod).__name__.endswith("RMSNorm"):
            continue
        w, eps = mod._parameters.get("weight"), _norm_eps(mod)
        if w is None or eps is None or w.dim() != 1 or w.device.type != "cpu" or w.dtype != torch.float32 \
                or "forward" in mod.__dict__ or list(mod.children()):
            continue
        if probe is None:
            if not available():
                return 0
            probe = torch.Generator().manual_seed(0)
        x = torch.randn(3, w.shape[0], generator=probe) * 3
        with torch.no_grad():
            want = type(mod).forward(mod, x)
            for offset in (0.0, 1.0):
                got = rms_norm(x, w, eps, offset)
                if want.shape == got.shape and want.dtype == got.dtype and \
                        torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                    mod._hf_paged_norm_eps, mod._hf_paged_norm_offset = eps, offset
                    mod.forward = _cpu_rms_norm_forward.__get__(mod)
                    count += 1
                    break
    return count


def remove_cpu_norms(model: torch.nn.Module) -> None:
    for mod in model.modules():
        if "_hf_paged_norm_offset" in mod.__dict__:
            for name in ("forward", "_hf_paged_norm_eps", "_hf_paged_norm_offset"):
                mod.__dict__.pop(name, None)
