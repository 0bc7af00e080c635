"""Triton segmented LoRA (SGMV, as in Punica and S-LoRA): ``out[t] += (x[t] @ A[s].T) @ B[s].T`` for
every token ``t`` of a segment whose adapter slot is ``s``; the GPU twin of ``reference.lora_add``.

Tokens are packed so that each adapter's tokens are one contiguous segment. Two launches:
``shrink`` computes ``v = x @ A[s].T`` (``[T, R]``, fp32) one ``BLOCK_M``-row tile of a segment per
program; ``expand`` adds ``v @ B[s].T`` into ``out`` one ``[BLOCK_M, BLOCK_N]`` tile per program. A
program whose segment's adapter does not target this layer (rank 0), or whose tile lies past the
segment's end, returns at once, so base-model tokens and untargeted layers cost nothing.
``A``/``B`` are stacked over slots and zero-padded to one rank ``R`` (a power of two, >= 16), with
each slot's LoRA scaling applied to the expanded product (as PEFT does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_rows(rank_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, BLOCK_M: tl.constexpr):
    """This program's segment and row tile: (slot, idle, first token, rows, rows inside the segment).
    Idle: the adapter does not target this layer, or the tile lies past the segment's end."""
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    slot = tl.load(seg_slot_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    idle = (tl.load(rank_ptr + slot) == 0) | (tile * BLOCK_M >= length)
    start = tl.load(seg_start_ptr + seg).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    return slot, idle, start, rows, rows < length


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, v_ptr, rank_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
    K, stride_xt, stride_as, stride_ar, stride_vt,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    slot, idle, start, rows, row_ok = _tile_rows(rank_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, BLOCK_M)
    if idle:
        return
    r = tl.arange(0, R)
    acc = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(x_ptr + (start + rows)[:, None] * stride_xt + k[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_base + r[None, :] * stride_ar + k[:, None], mask=k_ok[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
    tl.store(v_ptr + (start + rows)[:, None] * stride_vt + r[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _expand_kernel(
    v_ptr, b_ptr, out_ptr, rank_ptr, scale_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
    N, stride_vt, stride_bs, stride_bn, stride_ot,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    slot, idle, start, rows, row_ok = _tile_rows(rank_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, BLOCK_M)
    if idle:
        return
    nblk = tl.program_id(2)
    r = tl.arange(0, R)
    n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    vt = tl.load(v_ptr + (start + rows)[:, None] * stride_vt + r[None, :], mask=row_ok[:, None], other=0.0)
    bt = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + n[None, :] * stride_bn + r[:, None],
                 mask=n_ok[None, :], other=0.0)
    if IEEE:
        delta = tl.dot(vt, bt.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(vt.to(bt.dtype), bt)
    delta = delta * tl.load(scale_ptr + slot)
    dst = out_ptr + (start + rows)[:, None] * stride_ot + n[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    cur = tl.load(dst, mask=ok, other=0.0)
    tl.store(dst, (cur.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=ok)


def lora_add_triton(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor,
                    scales: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor, seg_slot: torch.Tensor,
                    max_len: int) -> None:
    """In place: ``out [T, N] += segmented LoRA of x [T, K]`` with ``a [S, R, K]``, ``b [S, N, R]``,
    ``ranks``/``scales`` ``[S]`` and segments ``seg_start``/``seg_len``/``seg_slot`` ``[n]`` (int32)."""
    if x.dim() != 2 or out.dim() != 2 or out.shape[0] != x.shape[0] or out.stride(1) != 1:
        raise ValueError(f"x must be [T, K] and out [T, N]; got {tuple(x.shape)} and {tuple(out.shape)}")
    S, R, K = a.shape
    if b.shape != (S, out.shape[1], R) or x.shape[1] != K:
        raise ValueError(f"a [S, R, K] = {tuple(a.shape)} and b [S, N, R] = {tuple(b.shape)} do not fit "
                         f"x {tuple(x.shape)} and out {tuple(out.shape)}")
    if R < 16 or R & (R - 1):
        raise ValueError(f"the stacked rank R must be a power of two >= 16, got {R}")
    n_seg = seg_slot.shape[0]
    if n_seg == 0 or max_len == 0:
        return
    # The kernels take x's, a's and b's last dim and the per-slot and per-segment vectors with unit stride.
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    ranks, scales = ranks.contiguous(), scales.contiguous()
    seg_start, seg_len, seg_slot = seg_start.contiguous(), seg_len.contiguous(), seg_slot.contiguous()
    ieee = x.dtype == torch.float32
    block_m = 16
    v = torch.empty((x.shape[0], R), dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(max_len, block_m)
    _shrink_kernel[(n_seg, tiles)](
        x, a, v, ranks, seg_start, seg_len, seg_slot,
        K, x.stride(0), a.stride(0), a.stride(1), v.stride(0),
        R=R, BLOCK_M=block_m, BLOCK_K=64, IEEE=ieee)
    N = out.shape[1]
    block_n = 64
    _expand_kernel[(n_seg, tiles, triton.cdiv(N, block_n))](
        v, b, out, ranks, scales, seg_start, seg_len, seg_slot,
        N, v.stride(0), b.stride(0), b.stride(1), out.stride(0),
        R=R, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee)
