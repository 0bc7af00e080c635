"""What ``wrap()`` patches into a CPU model (its step 5): ``nn.Linear`` and RMSNorm forwards rerouted
to the C++ kernels of :mod:`hf_paged.kernels.cpu`. ``install(model)`` / ``remove(model)``; each
reroute is also reachable alone (and switched off by its environment variable).
"""
from __future__ import annotations

import logging
import os

import torch

from . import cpu

logger = logging.getLogger(__name__)


def install(model: torch.nn.Module) -> tuple[int, int]:
    """Reroute what can be rerouted; returns (linear layers, norm modules) rerouted."""
    return install_cpu_linears(model), install_cpu_norms(model)


def remove(model: torch.nn.Module) -> None:
    remove_cpu_linears(model)
    remove_cpu_norms(model)


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
# That was an AVX2 comparison. On AVX-512 CPUs oneDNN's products are twice as wide and the crossover comes
# sooner (2026-12-01, this project's Sapphire Rapids VM, `python benchmarks/cpu_kernels.py`: one decode
# step's matmuls with cold weights, skinny vs oneDNN, 1.6-1.7x faster at 1-8 rows, 1.07x at 16, 0.87x at 24,
# 0.78x at 48). There the skinny kernel serves up to SKINNY_MAX_ROWS_AVX512 rows, and for output layers of
# WIDE_OUT_FEATURES or more (a vocabulary: 49152 x 576 ran 1.1-1.5x faster on oneDNN from 12 rows) up to
# WIDE_SKINNY_MAX_ROWS.
SKINNY_MAX_ROWS_AVX512 = 16
WIDE_OUT_FEATURES = 16384
WIDE_SKINNY_MAX_ROWS = 8


def fp32_skinny_rows(out_features: int) -> int:
    """Up to how many rows an fp32 layer of ``out_features`` outputs runs the skinny kernel on this CPU."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return SKINNY_MAX_ROWS
    return WIDE_SKINNY_MAX_ROWS if out_features >= WIDE_OUT_FEATURES else SKINNY_MAX_ROWS_AVX512


def _skinny_enabled() -> bool:
    if os.environ.get("HF_PAGED_CPU_GEMM", "1").strip() == "0" or not cpu.available():
        return False
    return bool(torch.ops.hf_paged_cpu.skinny_linear_vectorized())


def _cpu_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Runs ~200 times per decode step: parameters are read from _parameters directly (no
    # nn.Module.__getattr__ round trip). fp32 and bf16 layers (installed only for those) each have a kernel.
    params = self._parameters
    weight, bias = params["weight"], params["bias"]
    # Not where autograd or CPU autocast must see F.linear (a trainable bias too: BitFit).
    if x.is_cpu and x.dtype == weight.dtype and not (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))) \
            and not torch.is_autocast_enabled("cpu"):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 0 < rows <= self._hf_paged_skinny_rows:
            ops = torch.ops.hf_paged_cpu
            op = ops.skinny_linear if x.dtype == torch.float32 else ops.skinny_linear_bf16
            y = op(x.reshape(rows, x.shape[-1]), weight, bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        if rows > 0 and self._hf_paged_onednn:
            packed = weight
            compiling = torch.compiler.is_compiling()
            if self._hf_paged_packed is not None:
                if not compiling and self._hf_paged_packed_of != (weight.data_ptr(), weight._version):
                    _pack(self)  # the weights changed in place or were replaced since they were packed
                packed = self._hf_paged_packed
            if compiling:  # an opaque call: inductor's own lowering rejects packed weights
                y = onednn_linear(x.reshape(rows, x.shape[-1]), packed, bias)
            else:
                y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), packed, bias, "none", [], "")
            return y.view(*x.shape[:-1], y.shape[-1])
    return torch.nn.functional.linear(x, weight, bias)


@torch.library.custom_op("hf_paged::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear on a plain or packed (``_reorder_linear_weight``) weight, as one op that
    torch.compile calls as is (EngineConfig.compile)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


# bf16 models: their F.linear goes to oneDNN with avx512_bf16 dot products, which is hard to beat from a
# few rows up; for 1-3 rows (one request decoding: the interactive case) the C++ kernel of
# csrc/linear_bf16_cpu.cpp ran a decode step's matmuls 1.18-1.40x faster on this project's CPU
# (docs/benchmarks.md), 1.15-1.21x for 1-2 rows on its AVX2 path. HF_PAGED_CPU_GEMM_BF16=0 turns it off.
BF16_SKINNY_MAX_ROWS = {"avx512_bf16": 3, "avx2": 2, "scalar": 0}
# From 2 rows on, oneDNN with the weights reordered once into its blocked layout
# (torch.ops.mkldnn._reorder_linear_weight, as inductor's CPU freezing does) beats both the C++
# kernel and F.linear, which reorders on every call: a decode step's matmuls at 64 rows ran ~1.2x
# faster, the 49152-wide output layer 1.4x (8 rows: 2.4x), and PagedPipeline's bf16 throughput rose
# ~17% (docs/benchmarks.md). The cost is a second copy of the linear weights in memory, so it is
# skipped where that copy would exceed a quarter of the free memory; HF_PAGED_ONEDNN_PACK_BF16=0
# turns it off. One row keeps the C++ kernel (as fast or faster for the per-layer projections: 0.4-1.0x
# the packed call's time), except for outputs of BF16_PACKED_ONE_ROW_MIN_OUT or more (the vocabulary-wide
# output layer), where the packed call streamed the weights 1.03-1.3x faster in interleaved runs.
BF16_SKINNY_ROWS_WITH_PACKED = 1
BF16_PACKED_ONE_ROW_MIN_OUT = 16384
PACK_BATCH_HINT = 64


def _bf16_skinny_rows() -> int:
    if os.environ.get("HF_PAGED_CPU_GEMM_BF16", "1").strip() == "0" or not cpu.available():
        return 0
    return BF16_SKINNY_MAX_ROWS.get(cpu.bf16_linear_path(), 0)


def install_cpu_linears(model: torch.nn.Module) -> int:
    """Route the CPU fp32 ``nn.Linear`` layers of ``model`` through the C++ skinny kernel (few rows)
    and oneDNN (more rows), where each is enabled; returns how many layers were rerouted."""
    onednn = os.environ.get("HF_PAGED_ONEDNN_LINEAR", "1").strip() != "0" and torch.backends.mkldnn.is_available()
    skinny = None  # whether the C++ skinny kernel is enabled (checked once)
    bf16_rows = None
    pack = None
    count = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        own = mod.__dict__.get("forward")
        if own is not None and getattr(own, "__func__", None) is not _cpu_linear_forward:
            continue  # a forward of its own (accelerate's hooks, a user's patch) stays
        if type(mod) is torch.nn.Linear and type(w) is torch.nn.Parameter and w.device.type == "cpu" \
                and w.dtype == torch.bfloat16 and w.is_contiguous():
            if bf16_rows is None:
                bf16_rows = _bf16_skinny_rows()
                if bf16_rows:
                    logger.info("hf_paged: bf16 linear layers use the C++ %s kernel up to %d rows",
                                cpu.bf16_linear_path(), bf16_rows)
            if pack is None:
                pack = _bf16_pack_enabled(model)
                if bf16_rows is not None and pack:
                    bf16_rows = min(bf16_rows, BF16_SKINNY_ROWS_WITH_PACKED)
            if bf16_rows or pack:
                _reroute(mod, 0 if pack and w.shape[0] >= BF16_PACKED_ONE_ROW_MIN_OUT else bf16_rows, onednn=pack)
                if pack:
                    _pack(mod)
                count += 1
            continue
        # Sharded (DTensor) weights under tensor parallelism keep their own forward: transformers'
        # hooks redistribute their inputs and outputs around it.
        if type(mod) is torch.nn.Linear and type(w) is torch.nn.Parameter and w.device.type == "cpu" \
                and w.dtype == torch.float32 and w.is_contiguous():
            if skinny is None:
                skinny = _skinny_enabled()
            if not onednn and not skinny:
                return count
            _reroute(mod, fp32_skinny_rows(mod.out_features) if skinny else 0, onednn)
            count += 1
    _repack_after_merges(model)
    return count


def _repack_after_merges(model: torch.nn.Module) -> None:
    """PEFT merges an adapter into its base layer's weight through ``weight.data``, which moves no version
    counter: the packed copy would go stale unseen. Each PEFT layer over a packed linear re-packs it after
    its ``merge``/``unmerge`` (which ``merge_adapter``, ``unmerge_adapter`` and ``merge_and_unload`` call)."""
    for layer in model.modules():
        base = getattr(layer, "base_layer", None)
        if base is None or getattr(base, "_hf_paged_packed", None) is None:
            continue
        for name in ("merge", "unmerge"):
            original = getattr(layer, name, None)
            if callable(original) and not getattr(original, "_hf_paged_repacks", False):
                layer.__dict__[name] = _repacking(original, base)


def _repacking(original, base: torch.nn.Linear):
    def call(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            if base.__dict__.get("_hf_paged_packed") is not None:
                _pack(base)
    call._hf_paged_repacks = True
    return call


def _bf16_pack_enabled(model: torch.nn.Module) -> bool:
    """Whether a bf16 model's linear layers get a oneDNN-packed copy of their weights (see above): on
    unless HF_PAGED_ONEDNN_PACK_BF16=0, or the copy would take more than a quarter of the free memory."""
    if os.environ.get("HF_PAGED_ONEDNN_PACK_BF16", "1").strip() == "0" or not torch.backends.mkldnn.is_available():
        return False
    size = sum(m.weight.numel() * 2 for m in model.modules()
               if type(m) is torch.nn.Linear and type(m.weight) is torch.nn.Parameter
               and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu")
    from ..kv.pool import available_host_bytes

    free = available_host_bytes()
    if free is not None and size > free // 4:
        logger.info("hf_paged: bf16 linear weights not packed for oneDNN: the copy (%.1f GiB) would take more "
                    "than a quarter of the free memory", size / 2**30)
        return False
    logger.info("hf_paged: bf16 linear layers from %d rows use oneDNN with packed weights (+%.0f MiB)",
                BF16_SKINNY_ROWS_WITH_PACKED + 1, size / 2**20)
    return True


def _pack(mod: torch.nn.Linear) -> None:
    w = mod._parameters["weight"]
    mod._hf_paged_packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_BATCH_HINT)
    mod._hf_paged_packed_of = (w.data_ptr(), w._version)


def _reroute(mod: torch.nn.Linear, skinny_rows: int, onednn: bool) -> None:
    mod._hf_paged_skinny_rows, mod._hf_paged_onednn, mod._hf_paged_packed = skinny_rows, onednn, None
    mod.forward = _cpu_linear_forward.__get__(mod)


def remove_cpu_linears(model: torch.nn.Module) -> None:
    for mod in model.modules():
        for name in ("merge", "unmerge"):
            if getattr(mod.__dict__.get(name), "_hf_paged_repacks", False):
                del mod.__dict__[name]
        if type(mod) is torch.nn.Linear and getattr(mod.__dict__.get("forward"), "__func__", None) \
                is _cpu_linear_forward:
            for name in ("forward", "_hf_paged_skinny_rows", "_hf_paged_onednn", "_hf_paged_packed",
                         "_hf_paged_packed_of"):
                mod.__dict__.pop(name, None)


# ---------------------------------------------------------------------------------------- RMSNorm
# transformers' RMSNorm modules run ~8 small ops per call (to, pow, mean, add, rsqrt, mul, to, mul),
# twice per layer and step: ~50 us each at decode sizes, against ~5 us for one fused C++ pass.
# A module is rerouted only if the fused op reproduces its own forward on a probe input (so
# variants with another formula are left alone); HF_PAGED_CPU_NORM=0 turns this off.


def _cpu_rms_norm_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = self._parameters["weight"]
    if x.is_cpu and x.dtype == weight.dtype and not (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad)):
        if x.dtype == torch.float32:
            return torch.ops.hf_paged_cpu.rms_norm(x, weight, self._hf_paged_norm_eps, self._hf_paged_norm_offset)
        return torch.ops.hf_paged_cpu.rms_norm_bf16(x, weight, self._hf_paged_norm_eps, self._hf_paged_norm_offset,
                                                    self._hf_paged_norm_round_first)
    return type(self).forward(self, x)


def _norm_eps(mod: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(mod, name, None)
        if isinstance(eps, float):
            return eps
    return None


def install_cpu_norms(model: torch.nn.Module) -> int:
    """Route the CPU fp32 and bf16 RMSNorm modules of ``model`` through the fused C++ ops; returns how many.

    Each module is probed: fp32 must match its own forward to 1e-5; bf16 takes the variant (offset 0 or 1,
    rounding to bf16 before or after the weight) whose output equals the module's most often, and only if
    at most 1 value in 200 differs, by at most one bf16 step (the sum of squares runs in another order)."""
    if os.environ.get("HF_PAGED_CPU_NORM", "1").strip() == "0":
        return 0
    count = 0
    probe = None
    for mod in model.modules():
        if not type(mod).__name__.endswith("RMSNorm"):
            continue
        w, eps = mod._parameters.get("weight"), _norm_eps(mod)
        if w is None or type(w) is not torch.nn.Parameter or eps is None or w.dim() != 1 \
                or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) \
                or "forward" in mod.__dict__ or list(mod.children()):
            continue
        if probe is None:
            if not cpu.available():
                return 0
            probe = torch.Generator().manual_seed(0)
        variant = _probe_norm(mod, w, eps, probe)
        if variant is not None:
            mod._hf_paged_norm_eps, (mod._hf_paged_norm_offset, mod._hf_paged_norm_round_first) = eps, variant
            mod.forward = _cpu_rms_norm_forward.__get__(mod)
            count += 1
    return count


def _probe_norm(mod: torch.nn.Module, w: torch.Tensor, eps: float,
                gen: torch.Generator) -> tuple[float, bool] | None:
    """The (offset, round_first) with which the fused op reproduces ``mod``'s forward, or None."""
    with torch.no_grad():
        if w.dtype == torch.float32:
            x = torch.randn(3, w.shape[0], generator=gen) * 3
            want = type(mod).forward(mod, x)
            for offset in (0.0, 1.0):
                got = cpu.rms_norm(x, w, eps, offset)
                if want.shape == got.shape and want.dtype == got.dtype and \
                        torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                    return offset, True
            return None
        x = (torch.randn(16, w.shape[0], generator=gen) * 3).bfloat16()
        want = type(mod).forward(mod, x)
        if want.shape != x.shape or want.dtype != torch.bfloat16:
            return None
        best, best_bad = None, None
        for offset in (0.0, 1.0):
            for round_first in (True, False):
                got = cpu.rms_norm_bf16(x, w, eps, offset, round_first=round_first)
                close = torch.allclose(got.float(), want.float(), rtol=2.0 ** -7, atol=1e-30)
                bad = int((got != want).sum())
                if close and (best_bad is None or bad < best_bad):
                    best, best_bad = (offset, round_first), bad
        if best is None or best_bad * 200 > x.numel():
            return None
        return best


def remove_cpu_norms(model: torch.nn.Module) -> None:
    for mod in model.modules():
        if "_hf_paged_norm_offset" in mod.__dict__:
            for name in ("forward", "_hf_paged_norm_eps", "_hf_paged_norm_offset", "_hf_paged_norm_round_first"):
                mod.__dict__.pop(name, None)
