"""Fresh prefill: causal attention of new sequences over the K/V their layer has just computed.

When no sequence of a step has cached context (every ``seq_len`` equals its ``q_len``), the keys and
values are the layer's own contiguous ``[T, KVH, D]`` tensors: there is nothing to gather from the
pages. The K/V are still written to the pool (by the caller) for the decode steps that follow.

- CUDA: FlashAttention-2's varlen forward, ``aten._flash_attention_forward`` (fp16/bf16, no softcap,
  GQA as it is);
- CPU: one ``scaled_dot_product_attention`` per sequence with ``is_causal`` (a window adds a mask).

``varlen_attention`` returns None where neither applies (softcap, fp32 on CUDA, a torch without the op):
the caller then runs the paged kernels, which give the same result.

Example::

    out = varlen_attention(q, k, v, cu_seqlens, [5, 7], 7, scale=0.125)   # [T, H, D] or None
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("hf_paged")


def _flash() -> object | None:
    """The flash-attention varlen op of this torch (CUDA builds), or None."""
    return getattr(torch.ops.aten, "_flash_attention_forward", None)


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     lens: list[int], max_seqlen: int, *, scale: float, sliding_window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor | None:
    """Causal attention of packed sequences ``query [T, H, D]`` over ``key``/``value [T, KVH, D]``
    (sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``, of host-side length ``lens[i]``).
    None when no fast path takes these inputs."""
    if softcap:
        return None
    window = sliding_window if sliding_window is not None and sliding_window > 0 else None
    if query.is_cuda:
        return _cuda(query, key, value, cu_seqlens, max_seqlen, scale, window)
    if query.device.type == "cpu":
        return _cpu(query, key, value, lens, scale, window)
    return None


def _cuda(query, key, value, cu_seqlens, max_seqlen, scale, window) -> torch.Tensor | None:
    op = _flash()
    if op is None or query.dtype not in (torch.float16, torch.bfloat16) or query.shape[-1] > 256 \
            or query.shape[1] % key.shape[1]:
        return None
    cu = cu_seqlens.to(torch.int32)
    try:
        # FlashAttention-2's varlen forward (what torch.nn.attention.varlen.varlen_attn calls): it takes
        # fewer K/V heads than query heads as they are (GQA), which varlen_attn only allows from the torch
        # version that has its enable_gqa flag. Causal; a window keeps keys i - window < j <= i.
        return op(query, key, value, cu, cu, max_seqlen, max_seqlen, 0.0, window is None, False, scale=scale,
                  window_size_left=window - 1 if window else -1, window_size_right=0)[0]
    except (RuntimeError, TypeError, ValueError) as exc:  # a head size, dtype or device flash cannot take
        key_ = (tuple(query.shape[1:]), key.shape[1], query.dtype, query.device)
        if key_ not in _refused:  # once per shape, not at every prefill
            _refused.add(key_)
            logger.warning("hf_paged: varlen flash attention refused these inputs (%s); the paged kernels run", exc)
        return None


_refused: set = set()


def _cpu(query, key, value, lens, scale, window) -> torch.Tensor:
    out = torch.empty_like(query)
    start = 0
    for n in lens:
        out[start : start + n] = causal_sdpa(query[start : start + n], key[start : start + n],
                                             value[start : start + n], scale, window)
        start += n
    return out


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                window: int | None) -> torch.Tensor:
    """One sequence's causal attention by SDPA: ``query [n, H, D]`` over its own ``key``/``value [n, KVH, D]``
    (query i sees keys i - window < j <= i), in ``query``'s dtype. fp16 on CPU runs in fp32, as the reference
    does (fp16 SDPA is slow there)."""
    n = query.shape[0]
    q, k, v = (t.transpose(0, 1)[None] for t in (query, key, value))
    if query.dtype == torch.float16 and query.device.type == "cpu":
        q, k, v = q.float(), k.float(), v.float()
    if window is not None and window > 0 and n > window:
        pos = torch.arange(n, device=query.device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        res = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        res = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return res[0].transpose(0, 1).to(query.dtype)
