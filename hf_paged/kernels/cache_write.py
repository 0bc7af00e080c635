"""Triton scatter of new K/V rows into their paged slots (the GPU twin of ``reference.write_kv``).

One program per token moves that token's whole ``[num_kv_heads, head_dim]`` slab for K and for V, so
a launch is a single pass over the new tokens whatever their slots are. Slot ``-1`` (padding) is
skipped with a store mask rather than a branch, which keeps the kernel branch-free.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    # int64: slot * row size overflows int32 once a layer's pool passes 2**31 elements.
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, DIM_PAD)
    inside = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    # Skip slot -1 through the head bound: (tensor & scalar bool) is not int1 in Triton's interpreter.
    keep = (h[:, None] < tl.where(slot >= 0, NUM_KV_HEADS, 0)) & (d[None, :] < HEAD_DIM)
    src = tok.to(tl.int64)
    k = tl.load(key_ptr + src * stride_kt + h[:, None] * stride_kh + d[None, :], mask=inside, other=0.0)
    v = tl.load(value_ptr + src * stride_vt + h[:, None] * stride_vh + d[None, :], mask=inside, other=0.0)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + h[:, None] * stride_kch + d[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch + d[None, :]
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=keep)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=keep)


def _check(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]; got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    want = (key.shape[0], k_cache.shape[2], k_cache.shape[3])
    if key.dim() != 3 or tuple(key.shape) != want or tuple(value.shape) != want:
        raise ValueError(
            f"key/value must be [T, num_kv_heads, head_dim] = {want} to fit the cache; got "
            f"{tuple(key.shape)} and {tuple(value.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must be [T={key.shape[0]}]; got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64; got {slot_mapping.dtype}")
    devices = {t.device for t in (key, value, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"write_kv tensors must share one device; got {sorted(map(str, devices))}")


def write_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ``[T, KVH, D]`` at ``slot_mapping`` ``[T]`` in place; -1 slots are skipped.

    Values are cast to the cache dtype. Example::

        write_kv_triton(k, v, k_cache, v_cache, torch.tensor([17, -1, 18], device="cuda"))
    """
    _check(key, value, k_cache, v_cache, slot_mapping)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    # The kernel indexes the last dim with unit stride; HF hands K/V over as transposed views.
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    slot_mapping = slot_mapping.contiguous()  # read by token index with unit stride
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a contiguous head_dim (stride 1)")
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
    )
