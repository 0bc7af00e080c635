"""Triton ``paged_attention``: validates the call, then picks the decode or the varlen kernel.

Decode (every sequence has at most one new token) goes to ``decode.py``, whose split-K keeps the GPU
busy when few sequences read long contexts; anything with a multi-token sequence goes to
``prefill.py``, which also serves the decode rows mixed into the same batch.
"""
from __future__ import annotations

import os

import torch

from .decode import paged_decode
from .prefill import paged_prefill

MAX_HEAD_DIM = 256  # head dims are padded to the next power of two (>= 16) inside the kernels
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(what: str) -> None:
    raise ValueError(f"paged_attention (triton): {what}")


def validate(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the first argument that the kernels cannot take."""
    if query.dim() != 3:
        _fail(f"query must be [tokens, heads, head_dim]; got shape {tuple(query.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        _fail("k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]; got "
              f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if query.dtype not in DTYPES:
        _fail(f"query dtype {query.dtype} is not supported; allowed: {', '.join(map(str, DTYPES))}")
    if k_cache.dtype != query.dtype or v_cache.dtype != query.dtype:
        _fail(f"query, k_cache and v_cache must share a dtype; got {query.dtype}, {k_cache.dtype}, "
              f"{v_cache.dtype}")
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        _fail(f"query head_dim {head_dim} differs from the cache's {cache_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        _fail(f"head_dim must be in 1..{MAX_HEAD_DIM} (e.g. 64, 80, 96, 128, 256); got {head_dim}")
    if block_size < 8 or block_size & (block_size - 1):
        _fail(f"block_size must be a power of two >= 8; got {block_size}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        _fail(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        _fail("k_cache/v_cache need a contiguous head_dim (stride 1)")
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if num_seqs < 0:
        _fail(f"seq_lens must be [num_seqs]; got shape {tuple(seq_lens.shape)}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] != num_seqs + 1:
        _fail(f"cu_seqlens_q must be [num_seqs + 1 = {num_seqs + 1}]; got shape {tuple(cu_seqlens_q.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        _fail(f"block_tables must be [num_seqs = {num_seqs}, max_blocks]; got shape {tuple(block_tables.shape)}")
    for name, t in (("block_tables", block_tables), ("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens)):
        if t.dtype not in _INDEX_DTYPES:
            _fail(f"{name} must be int32 or int64; got {t.dtype}")
    devices = {t.device for t in (query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)}
    if len(devices) != 1:
        _fail(f"all tensors must be on one device; got {sorted(map(str, devices))}")
    if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        _fail(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for testing); got {query.device}")


def paged_attention_triton(
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
    """Same contract as ``reference.paged_attention``; returns ``[T, H, D]`` in ``query``'s dtype.

    Example::

        out = paged_attention_triton(q, k_cache, v_cache, tables, cu_q, lens, scale=128 ** -0.5)
    """
    validate(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)
    # Same conventions as the reference: a window or softcap of 0 (or less for the window) is "off".
    window = sliding_window if sliding_window is not None and sliding_window > 0 else None
    if softcap is not None and softcap < 0:
        _fail(f"softcap must be positive (or 0/None for none); got {softcap}")
    cap = softcap if softcap else None
    if query.stride(-1) != 1:
        query = query.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()  # the kernels walk a table row with unit stride
    # The kernels index these by sequence with unit stride (no copy when they are contiguous already).
    cu_seqlens_q, seq_lens = cu_seqlens_q.contiguous(), seq_lens.contiguous()
    if max_seqlen_q is None:
        # One device sync; callers that know the batch shape pass the hint and avoid it.
        q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        max_seqlen_q = int(q_lens.max()) if q_lens.numel() else 0
    if max_seqlen_q <= 1:
        return paged_decode(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=scale,
                            sliding_window=window, softcap=cap, max_seqlen_k=max_seqlen_k)
    return paged_prefill(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=scale,
                         sliding_window=window, softcap=cap)
