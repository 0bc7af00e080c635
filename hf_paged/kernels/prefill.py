"""Varlen paged attention for packed new tokens: prefill, chunked prefill, prefix-cache hits, and
decode rows mixed into the same launch.

Grid: ``(query tiles of all sequences, num_kv_heads)``. A query tile holds ``BLOCK_M`` rows; the
rows are ``(token, head)`` pairs of one sequence and one KV head -- the ``group`` query heads that
share the KV head are folded into the rows, so each K/V tile is loaded once per group instead of
once per head. Which sequence a program serves is found on the device by binary search over the
cumulative tile counts, so a launch needs no host sync and no program is wasted on padding.

For each tile the key range splits into at most three loops: a masked lower edge (sliding window),
a run of key tiles every row of the query tile may see (no mask arithmetic), and the masked
diagonal. K/V are read through the block table one key tile (``BLOCK_N`` tokens, which may span or
split cache blocks) at a time; scores are fp32 with an online softmax in base 2.

``attend_tiles`` is the inner loop shared with the decode kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@dataclass(slots=True, frozen=True)
class PrefillTiles:
    """Launch shape: query rows per program, keys per inner step, and Triton's warps/stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_tiles(head_dim_pad: int, dtype: torch.dtype, group: int, on_gpu: bool) -> PrefillTiles:
    """Tile shape that keeps Q, a K/V tile per stage and the fp32 accumulator within shared memory."""
    if not on_gpu:
        # Triton's interpreter pays per operation, not per element: few, large tiles run fastest.
        tiles = PrefillTiles(block_m=128, block_n=128, num_warps=4, num_stages=1)
    elif head_dim_pad > 128 or dtype == torch.float32:
        tiles = PrefillTiles(block_m=64, block_n=32, num_warps=4, num_stages=2)
    else:
        tiles = PrefillTiles(block_m=128, block_n=64, num_warps=8, num_stages=2)
    # Every tile must hold the whole head group of at least one token.
    block_m = max(tiles.block_m, triton.next_power_of_2(group))
    return PrefillTiles(block_m, tiles.block_n, tiles.num_warps, tiles.num_stages)


def logit_params(scale: float, softcap: float | None) -> tuple[float, float]:
    """``(pre, post)`` such that base-2 logits are ``qk*pre`` or ``tanh(qk*pre)*post`` with softcap."""
    if softcap is None:
        return scale * LOG2E, 1.0
    return scale / softcap, softcap * LOG2E


@triton.jit
def _tanh(x):
    # tl has no portable tanh (libdevice is CUDA-only and missing in the interpreter); this form
    # never overflows because the exponent is always <= 0.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def attend_tiles(
    acc, m_i, l_i, q, pos,
    k_ptr, v_ptr, bt_row, start, stop, key_lo, key_hi, window, pre, post,
    stride_kb, stride_ks, stride_vb, stride_vs, d, d_mask,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold key tiles ``[start, stop)`` into the running softmax state ``(acc, m_i, l_i)``.

    ``pos`` is each query row's absolute position; only keys in ``[key_lo, key_hi)`` are ever read
    (so unused cache slots and stale block-table entries are never touched). With ``MASK`` false the
    caller guarantees that every key in range is visible to every row.
    """
    for n0 in range(start, stop, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        if MASK:
            live = (k_pos >= key_lo) & (k_pos < key_hi)
            block = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
            kv_mask = live[:, None] & d_mask[None, :]
        else:
            block = tl.load(bt_row + k_pos // BLOCK_SIZE).to(tl.int64)
            kv_mask = d_mask[None, :]
        in_block = k_pos % BLOCK_SIZE
        k_rows = k_ptr + block * stride_kb + in_block * stride_ks
        k = tl.load(k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP:
            s = _tanh(qk * pre) * post
        else:
            s = qk * pre
        if MASK:
            visible = live[None, :] & (k_pos[None, :] <= pos[:, None])
            if WINDOW:
                visible = visible & (k_pos[None, :] > pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead to avoid NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = v_ptr + block * stride_vb + in_block * stride_vs
        v = tl.load(v_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# num_seqs changes every step: not specialised on its value (1, multiples of 16), so that a new batch
# size does not compile another variant in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, cu_q_ptr, lens_ptr, cu_tiles_ptr, out_ptr,
    pre, post, window, num_seqs,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    # The sequence of this tile: the largest i with cu_tiles[i] <= pid (empty sequences repeat a
    # value, so the largest index lands on the sequence that owns the tile).
    lo = pid * 0
    hi = lo + num_seqs
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        ok = tl.load(cu_tiles_ptr + mid) <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    alive = lo < num_seqs  # the grid is an upper bound on the tile count
    seq = tl.minimum(lo, num_seqs - 1)
    tile = pid - tl.load(cu_tiles_ptr + seq)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    seq_len = tl.load(lens_ptr + seq)
    tok0 = tile * BLOCK_Q
    n_tok = tl.where(alive, tl.minimum(q_len - tok0, BLOCK_Q), 0)

    r = tl.arange(0, BLOCK_M)
    tok = tok0 + r // GROUP
    head = kvh * GROUP + r % GROUP
    row_ok = (r < BLOCK_Q * GROUP) & (r // GROUP < n_tok)
    pos = seq_len - q_len + tok
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    row_off = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None] & d_mask[None, :], other=0.0)

    pos_min = seq_len - q_len + tok0
    pos_max = pos_min + n_tok - 1
    key_hi = tl.where(n_tok > 0, pos_max + 1, 0)
    key_lo = seq_len * 0  # tensors, not Python ints, so both WINDOW variants type the same way
    full_lo = seq_len * 0
    if WINDOW:
        key_lo = tl.maximum(pos_min - window + 1, 0)
        full_lo = tl.maximum(pos_max - window + 1, 0)
    lo_n = key_lo // BLOCK_N * BLOCK_N
    # [mid_lo, mid_hi): whole key tiles visible to every row of this query tile.
    mid_lo = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo_n), key_hi)
    mid_hi = tl.maximum(tl.minimum((pos_min + 1) // BLOCK_N * BLOCK_N, key_hi), mid_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0, tl.float32)
    acc = tl.full([BLOCK_M, D_PAD], 0, tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, pos, k_base, v_base, bt_row, lo_n, mid_lo, key_lo, key_hi, window, pre, post,
        stride_kb, stride_ks, stride_vb, stride_vs, d, d_mask,
        BLOCK_SIZE, BLOCK_N, True, WINDOW, SOFTCAP, PRECISION)
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, pos, k_base, v_base, bt_row, mid_lo, mid_hi, key_lo, key_hi, window, pre, post,
        stride_kb, stride_ks, stride_vb, stride_vs, d, d_mask,
        BLOCK_SIZE, BLOCK_N, False, WINDOW, SOFTCAP, PRECISION)
    acc, m_i, l_i = attend_tiles(
        acc, m_i, l_i, q, pos, k_base, v_base, bt_row, mid_hi, key_hi, key_lo, key_hi, window, pre, post,
        stride_kb, stride_ks, stride_vb, stride_vs, d, d_mask,
        BLOCK_SIZE, BLOCK_N, True, WINDOW, SOFTCAP, PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    out_off = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + out_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 on tensor cores: the fp32 path is the accurate one.
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_prefill(
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
    tiles: PrefillTiles | None = None,
) -> torch.Tensor:
    """Varlen causal attention over paged K/V (arguments as ``paged_attention``; validated there).

    ``tiles`` overrides the launch shape (tests use small key tiles to reach every loop).
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.zeros_like(query)  # padding rows and empty sequences stay zero
    if num_tokens == 0 or num_seqs == 0:
        return out
    d_pad = max(16, triton.next_power_of_2(head_dim))
    tiles = tiles or default_tiles(d_pad, query.dtype, group, query.is_cuda)
    block_q = tiles.block_m // group
    if block_q < 1:
        raise ValueError(f"block_m={tiles.block_m} cannot hold a head group of {group}")
    # Tiles per sequence and their running sum, on the device: no host sync before the launch.
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.int32)
    cu_tiles = torch.zeros(num_seqs + 1, dtype=torch.int32, device=query.device)
    torch.cumsum((q_lens + block_q - 1) // block_q, 0, out=cu_tiles[1:])
    # sum(ceil(q_len / block_q)) < num_tokens / block_q + num_seqs bounds the tile count.
    grid = (triton.cdiv(num_tokens, block_q) + num_seqs, num_kv_heads)
    pre, post = logit_params(scale, softcap)
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, cu_tiles, out,
        pre, post, sliding_window or 0, num_seqs,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=tiles.block_m, BLOCK_Q=block_q, BLOCK_N=tiles.block_n,
        # Steps of the tile -> sequence search, rounded up to a multiple of 4 (extra steps leave it where it
        # is): three variants cover up to 4095 sequences instead of one per power of two.
        SEARCH_STEPS=-(-max(1, math.ceil(math.log2(num_seqs + 1))) // 4) * 4,
        WINDOW=sliding_window is not None, SOFTCAP=softcap is not None,
        PRECISION=dot_precision(query.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
