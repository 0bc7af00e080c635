"""Kernel API: the only entry points the attention hook and the engine call.

``backend``: ``"triton"``, ``"cpu"`` (the compiled C++ decode kernel plus torch prefill, see
``cpu.py``), ``"torch"`` (pure torch, also the reference the others are tested against) or ``"auto"``
(Triton for CUDA tensors; on CPU ``cpu`` when its extension builds, ``torch`` otherwise). The
environment variable ``HF_PAGED_BACKEND`` (same values) overrides it for the whole process; tests set
it to ``triton`` together with ``TRITON_INTERPRET=1`` to run the Triton kernels on CPU.

Example::

    write_kv(key, value, k_cache, v_cache, slot_mapping)
    out = paged_attention(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=0.125)
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from . import reference

BACKENDS = ("auto", "triton", "cpu", "torch")


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The backend that will run for ``tensor``: the env override first, then ``backend``."""
    chosen = os.environ.get("HF_PAGED_BACKEND", "").strip().lower() or backend
    if chosen not in BACKENDS:
        raise ValueError(f"unknown kernel backend {chosen!r}; allowed: {', '.join(BACKENDS)}")
    if chosen == "auto":
        if tensor.is_cuda:
            return "triton"
        if tensor.device.type == "cpu":
            from . import cpu

            return "cpu" if cpu.available() else "torch"
        return "torch"
    return chosen


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s CUDA device the current one while a Triton kernel launches: Triton launches on the
    current device and its stream, whatever its arguments' device (a model placed on cuda:1, or spread
    over GPUs by a ``device_map``, would otherwise run its kernels on cuda:0's stream)."""
    index = t.device.index
    if index is None or index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(index)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str = "auto",
) -> None:
    """Store new ``key``/``value`` ``[T, KVH, D]`` at ``slot_mapping`` ``[T]`` (-1 = skip) in place."""
    chosen = resolve_backend(backend, key)
    if chosen == "triton":
        from .cache_write import write_kv_triton

        with on_device(key):
            return write_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    if chosen == "cpu":
        from .cpu import write_kv as cpu_write_kv

        return cpu_write_kv(key, value, k_cache, v_cache, slot_mapping)
    return reference.write_kv(key, value, k_cache, v_cache, slot_mapping)


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
    backend: str = "auto",
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens ``[T, H, D]`` over paged K/V; returns ``[T, H, D]``.

    ``cu_seqlens_q`` ``[S+1]`` delimits the new tokens of S sequences; ``seq_lens`` ``[S]`` counts each
    sequence's tokens including the new ones; ``block_tables`` ``[S, max_blocks]``. ``max_seqlen_q``/
    ``max_seqlen_k`` are optional host-side hints that spare a device sync. ``new_kv``: the step's own K/V
    ``[T, KVH, D]`` packed like the queries; the torch and CPU backends attend prompts without cached
    context over them instead of their blocks (the Triton kernel reads the pages).
    """
    if softcap is not None and softcap < 0:  # the C++ kernel would take it as "off", the torch path as |softcap|
        raise ValueError(f"softcap must be positive (or 0/None for none); got {softcap}")
    chosen = resolve_backend(backend, query)
    if chosen == "triton":
        from .attention import paged_attention_triton

        with on_device(query):
            return paged_attention_triton(
                query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=scale,
                sliding_window=sliding_window, softcap=softcap,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            )
    impl = reference.paged_attention
    if chosen == "cpu":
        from .cpu import paged_attention as impl
    return impl(
        query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=scale,
        sliding_window=sliding_window, softcap=softcap,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, new_kv=new_kv,
    )


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     lens: list[int], max_seqlen: int, *, scale: float, sliding_window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor | None:
    """Causal attention of fresh sequences (no cached context) over their contiguous K/V: flash
    varlen on CUDA, SDPA per sequence on CPU; None where neither applies (see ``varlen.py``)."""
    from .varlen import varlen_attention as impl

    return impl(query, key, value, cu_seqlens, lens, max_seqlen, scale=scale, sliding_window=sliding_window,
                softcap=softcap)


def lora_add(out: torch.Tensor, x: torch.Tensor, weights: Any, batch: Any, *, backend: str = "auto") -> None:
    """Segmented LoRA in place: ``out[s:e] += (x[s:e] @ A[slot].T) @ B[slot].T * scale[slot]`` for each
    segment ``(s, e, slot)`` of packed tokens; ``x [T, K]``, ``out [T, N]``.

    ``weights``: a :class:`hf_paged.lora.layers.LayerWeights` (one layer's adapters stacked by slot),
    ``batch``: a :class:`hf_paged.lora.LoraBatch` (this step's segments). A slot of rank 0 (an adapter
    that does not target this layer) and tokens in no segment (the base model) are left alone. Triton
    runs the SGMV kernels (``lora.py``); ``cpu`` the C++ kernel (fp32; ``csrc/lora_cpu.cpp``); ``torch``
    one pair of matmuls per segment (``reference.lora_add``).
    """
    end = max((e for _, e, _ in batch.segments), default=0)
    if end > x.shape[0] or out.shape[0] != x.shape[0]:  # the kernels would read and write past the rows
        raise ValueError(f"lora_add: segments reach token {end} of x [{x.shape[0]}, ...] (out [{out.shape[0]}, ...])")
    chosen = resolve_backend(backend, x)
    if chosen == "triton":
        from .lora import lora_add_triton

        seg = batch.device_args
        if seg is None or seg[0].device != x.device:
            seg = tuple(torch.tensor(col, dtype=torch.int32, device=x.device)
                        for col in zip(*[(s, e - s, slot) for s, e, slot in batch.segments]))
        with on_device(x):
            return lora_add_triton(out, x, weights.a, weights.b, weights.ranks_t.to(x.device),
                                   weights.scales_t.to(x.device), *seg, batch.max_len)
    if chosen == "cpu" and x.dtype == torch.float32 and weights.a.dtype == torch.float32:
        from .cpu import lora_sgmv

        return lora_sgmv(out, x, weights.a, weights.bt, weights.ranks_t, weights.scales_t, batch.token_slot)
    return reference.lora_add(out, x, weights.a, weights.b, weights.ranks, weights.scales, batch.segments)


__all__ = ["write_kv", "paged_attention", "varlen_attention", "lora_add", "resolve_backend", "BACKENDS"]
