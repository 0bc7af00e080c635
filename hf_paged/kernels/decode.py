"""Paged decode attention (one new token per sequence) with split-K over the context.

Grid: ``(num_seqs, num_kv_heads, num_splits)``. A program owns every query head of one KV head
(GQA group, padded to >= 16 rows because ``tl.dot`` needs it), so each K/V byte is read once per
group. Decode is bound by memory bandwidth, so the context is split across programs when
``seqs x kv_heads`` alone cannot keep the GPU's SMs busy (flash-decoding); each split writes a
normalised partial output and its log-sum-exp, and ``_reduce_kernel`` merges the splits.
With one split the first kernel writes the output directly and the reduce launch is skipped.

With a sliding window only the key tiles inside the window are walked and shared among the splits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .prefill import attend_tiles, dot_precision, logit_params

# Fewer keys than this per split would spend more on writing and merging partials than it saves.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 32
# Resident programs per SM worth aiming for: a memory-bound kernel needs several in flight.
PROGRAMS_PER_SM = 2

_sm_count: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs serially)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index]


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_keys: int, num_sms: int) -> int:
    """Splits of each context so the launch fills ``num_sms`` without splitting short contexts.

    ``max_keys`` is the longest context to walk (already clipped to the sliding window).
    """
    programs = max(1, num_seqs * num_kv_heads)
    target = PROGRAMS_PER_SM * num_sms
    if programs >= target:
        return 1
    wanted = triton.cdiv(target, programs)
    by_length = max(1, max_keys // MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def default_block_n(head_dim_pad: int, on_gpu: bool) -> int:
    """Keys per inner step: two K/V tiles of this many rows stay small enough to double-buffer."""
    if not on_gpu:
        return 128  # the interpreter pays per operation: fewer, larger steps
    return 32 if head_dim_pad > 128 else 64


@triton.jit(do_not_specialize=["num_splits"])  # it follows the batch: no variant per value
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, cu_q_ptr, lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    pre, post, window, num_heads, num_splits,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    # (tl.cdiv is avoided: it stays a compiled-only function when triton was imported before
    # TRITON_INTERPRET was set, and the interpreter then refuses to call it.)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(cu_q_ptr + seq)
    has_query = tl.load(cu_q_ptr + seq + 1) > row  # q_len may be 0: that sequence produces nothing
    seq_len = tl.load(lens_ptr + seq)
    key_lo = seq_len * 0
    if WINDOW:
        key_lo = tl.maximum(seq_len - window, 0)
    tile_lo = key_lo // BLOCK_N
    tile_hi = tl.where(has_query, (seq_len + BLOCK_N - 1) // BLOCK_N, tile_lo)
    per_split = (tile_hi - tile_lo + num_splits - 1) // num_splits
    t0 = tl.minimum(tile_lo + split * per_split, tile_hi)
    t1 = tl.minimum(t0 + per_split, tile_hi)

    g = tl.arange(0, GROUP_PAD)
    head = kvh * GROUP + g
    # (a vector & a scalar bool comes out as int32 in Triton's interpreter, so fold has_query into a bound)
    g_mask = g < tl.where(has_query, GROUP, 0)
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    q_off = row.to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    pos = tl.full([GROUP_PAD], 0, tl.int32) + (seq_len - 1)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.full([GROUP_PAD], 0, tl.float32)
    acc = tl.full([GROUP_PAD, D_PAD], 0, tl.float32)
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, pos,
        k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh, bt_ptr + seq.to(tl.int64) * stride_bt,
        t0 * BLOCK_N, t1 * BLOCK_N, key_lo, seq_len, window, pre, post,
        stride_kb, stride_ks, stride_vb, stride_vs, d, d_mask,
        BLOCK_SIZE, BLOCK_N, True, WINDOW, SOFTCAP, PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if SPLIT:
        # Partials are [seq, head, split, :]. An empty split kept m_i = -inf, so its lse is -inf and
        # it weighs nothing in the merge.
        part = (seq * num_heads + head) * num_splits + split
        lse = m_i + tl.log2(l_safe)
        tl.store(part_lse_ptr + part, lse, mask=g < GROUP)
        tl.store(part_o_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], out,
                 mask=(g < GROUP)[:, None] & d_mask[None, :])
    else:
        o_off = row.to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_kernel(
    cu_q_ptr, part_o_ptr, part_lse_ptr, out_ptr, num_heads, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(cu_q_ptr + seq)
    has_query = tl.load(cu_q_ptr + seq + 1) > row
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    part = (seq * num_heads + head) * num_splits + sp
    lse = tl.load(part_lse_ptr + part, mask=sp < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(lse - top)
    parts = tl.load(part_o_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
                    mask=(sp < num_splits)[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_off = row.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_off + d, out.to(out_ptr.dtype.element_ty), mask=d < tl.where(has_query, HEAD_DIM, 0))


def paged_decode(
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
    max_seqlen_k: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence (every q_len is 0 or 1) over paged K/V.

    Arguments as ``paged_attention`` (validated there). ``num_splits`` overrides the split heuristic
    and ``block_n`` the keys per inner step (tests use both to reach every path).
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.zeros_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_n = block_n or default_block_n(d_pad, query.is_cuda)
    if num_splits is None:
        # Without the host hint, the table width bounds the context and costs no device sync.
        max_keys = max_seqlen_k if max_seqlen_k is not None else block_tables.shape[1] * block_size
        if sliding_window is not None:
            max_keys = min(max_keys, sliding_window)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_keys, sm_count(query.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1; got {num_splits}")
    split = num_splits > 1
    if split:
        part_o = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                             device=query.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
    else:
        part_o = part_lse = out  # unused by the kernel when SPLIT is off
    pre, post = logit_params(scale, softcap)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, part_o, part_lse,
        pre, post, sliding_window or 0, num_heads, num_splits,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=split,
        WINDOW=sliding_window is not None, SOFTCAP=softcap is not None,
        PRECISION=dot_precision(query.dtype), num_warps=4, num_stages=2,
    )
    if split:
        _reduce_kernel[(num_seqs, num_heads)](
            cu_seqlens_q, part_o, part_lse, out, num_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=d_pad, SPLITS_PAD=triton.next_power_of_2(max(num_splits, MAX_SPLITS)),
        )
    return out
