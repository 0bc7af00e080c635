"""Fresh prefill over contiguous K/V (kernels.varlen) equals the paged reference."""
from __future__ import annotations

import pytest
import torch

from hf_paged.kernels import reference
from hf_paged.kernels.varlen import varlen_attention


def _case(lens, heads, kv_heads, dim, dtype, block=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q = torch.randn(total, heads, dim, generator=g).to(dtype)
    k = torch.randn(total, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(total, kv_heads, dim, generator=g).to(dtype)
    blocks_per = [-(-n // block) for n in lens]
    perm = torch.randperm(sum(blocks_per) + 3, generator=g).tolist()  # shuffled blocks
    k_cache = torch.zeros(len(perm), block, kv_heads, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    tables, slots, at = [], [], 0
    for n, nb in zip(lens, blocks_per):
        t = perm[at : at + nb]
        at += nb
        tables.append(t + [0] * (max(blocks_per) - nb))
        slots += [t[i // block] * block + i % block for i in range(n)]
    reference.write_kv(k, v, k_cache, v_cache, torch.tensor(slots))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), cu, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dim", [64, 80, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_cpu_varlen_equals_paged_reference(dim, heads, kv_heads, window):
    lens = [1, 17, 9, 40, 2]
    q, k, v, kc, vc, tables, cu, seq = _case(lens, heads, kv_heads, dim, torch.float32)
    ref = reference.paged_attention(q, kc, vc, tables, cu, seq, scale=dim ** -0.5, sliding_window=window)
    got = varlen_attention(q, k, v, cu, lens, max(lens), scale=dim ** -0.5, sliding_window=window)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cpu_varlen_bf16_and_softcap_declined():
    lens = [12, 30]
    q, k, v, kc, vc, tables, cu, seq = _case(lens, 8, 2, 64, torch.bfloat16)
    ref = reference.paged_attention(q, kc, vc, tables, cu, seq, scale=0.125)
    got = varlen_attention(q, k, v, cu, lens, 30, scale=0.125)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert varlen_attention(q, k, v, cu, lens, 30, scale=0.125, softcap=30.0) is None


@pytest.mark.parametrize("window", [None, 7])
def test_flash_call_binds_to_this_torch(window):
    """The CUDA path's call of aten._flash_attention_forward, on meta tensors: its arguments bind to this
    torch's schema and the output has the query's shape with fewer K/V heads (GQA)."""
    from hf_paged.kernels import varlen

    q = torch.empty(391, 16, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(391, 4, 128, dtype=torch.bfloat16, device="meta")
    cu = torch.empty(5, dtype=torch.int32, device="meta")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
        out = varlen.varlen_attention(q, k, k, cu, [1, 100, 33, 257], 257, scale=0.088, sliding_window=window)
    assert out is not None and out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads,kv_heads", [(16, 4), (8, 8)])
def test_cuda_flash_varlen_equals_paged_reference(dtype, window, heads, kv_heads):
    lens = [1, 100, 33, 257]
    q, k, v, kc, vc, tables, cu, seq = _case(lens, heads, kv_heads, 128, dtype)
    ref = reference.paged_attention(q, kc, vc, tables, cu, seq, scale=128 ** -0.5, sliding_window=window)
    got = varlen_attention(*(t.cuda() for t in (q, k, v, cu)), lens, 257, scale=128 ** -0.5, sliding_window=window)
    assert got is not None, "flash varlen declined inputs it should take (see the hf_paged warning above)"
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=2e-2, atol=2e-2)
