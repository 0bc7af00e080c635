"""The attention function that transformers calls for a wrapped model.

Registered under the name ``"hf_paged"`` with ``AttentionInterface`` only. No mask function is registered
on purpose: for an attention implementation without one, transformers' mask creation returns None at
once (its early exit for custom backends), which also skips its packed-sequence check on the position
ids (a ``.all()`` on the device: a host sync in every eager forward, which would stall async scheduling).
The attention function stores the layer's new K/V in their slots and attends over the paged K/V of
each sequence through its block table, all described by the ``paged_metadata`` keyword argument.
No dense mask is ever built: causality, padding and sliding windows follow from the metadata.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface

from . import kernels
from .kv.metadata import PagedMetadata

ATTN_NAME = "hf_paged"


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    paged_metadata: PagedMetadata | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query`` ``[B, H, q, D]``, ``key``/``value`` ``[B, KVH, q, D]`` (this forward's tokens only)."""
    if paged_metadata is None:
        raise RuntimeError(
            "hf_paged attention ran without paged_metadata: call the model wrapped by hf_paged.wrap() "
            "(its forward hook plans the KV slots) or pass paged_metadata from the engine")
    if s_aux is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by hf_paged")
    meta = paged_metadata
    layer = module.layer_idx
    k_cache, v_cache = meta.pool.k[layer], meta.pool.v[layer]
    b, h, q, d = query.shape
    kvh = key.shape[1]
    if k_cache.shape[2] != kvh or k_cache.shape[3] != key.shape[3]:
        raise ValueError(f"layer {layer}: K/V of shape {tuple(key.shape)} do not fit the pool's "
                         f"{tuple(k_cache.shape[2:])} (kv heads, head dim)")
    t = meta.on(query.device)
    # The cache is inference state: storing K/V must not tie the pool into an autograd graph.
    flat_k = key.detach().transpose(1, 2).reshape(b * q, kvh, key.shape[3])
    flat_v = value.detach().transpose(1, 2).reshape(b * q, kvh, value.shape[3])
    kernels.write_kv(flat_k, flat_v, k_cache, v_cache, t.slot_mapping)
    flat_q = query.transpose(1, 2).reshape(b * q, h, d)
    if t.token_index is not None:
        flat_q = flat_q.index_select(0, t.token_index)
    scale = d ** -0.5 if scaling is None else scaling
    out = None
    backend = kernels.resolve_backend("auto", flat_q) if meta.fresh else None
    if (backend == "cpu" and flat_q.device.type == "cpu") or (backend == "triton" and flat_q.is_cuda):
        # No cached context: attend over the K/V just computed, contiguous, without reading the pages.
        out = kernels.varlen_attention(flat_q, flat_k, flat_v, t.cu_seqlens_q, meta.q_lens, meta.max_seqlen_q,
                                       scale=scale, sliding_window=sliding_window, softcap=softcap)
    if out is None:
        new_kv = None
        if meta.max_seqlen_q > 1 and not flat_q.is_cuda and not softcap:
            # Prompts without cached context read the K/V just computed, not their blocks.
            new_kv = (flat_k, flat_v) if t.token_index is None else \
                (flat_k.index_select(0, t.token_index), flat_v.index_select(0, t.token_index))
        out = kernels.paged_attention(
            flat_q, k_cache, v_cache, t.block_tables, t.cu_seqlens_q, t.seq_lens,
            scale=scale, sliding_window=sliding_window, softcap=softcap,
            max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k, new_kv=new_kv,
        )
    if t.token_index is not None:
        full = out.new_zeros(b * q, h, value.shape[3])
        full.index_copy_(0, t.token_index, out)
        out = full
    return out.view(b, q, h, -1), None


def register() -> None:
    """Make ``attn_implementation="hf_paged"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
