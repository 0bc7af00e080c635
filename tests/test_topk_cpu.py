"""The C++ row top-k (``kernels/csrc/topk_cpu.cpp``) against torch, and the host sampler on it.

The reference is a stable descending sort: the same values as ``torch.topk`` and the order the kernel
promises among equal scores (lower index first, NaN above every number).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_paged.engine import warpers
from hf_paged.engine.params import SamplingParams
from hf_paged.engine.sampler import Sampler, SamplingRow
from hf_paged.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"C++ CPU kernel not built: {cpu.build_error()}")


def reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


def check(x: torch.Tensor, k: int) -> None:
    vals, idx = cpu.topk_rows(x, k)
    want_vals, want_idx = reference(x, k)
    assert torch.equal(vals.nan_to_num(7.5), want_vals.nan_to_num(7.5))
    assert torch.equal(idx, want_idx)
    assert torch.equal(vals.nan_to_num(7.5), torch.topk(x, k, dim=-1).values.nan_to_num(7.5))


@pytest.mark.parametrize("width", [1, 7, 33, 1000, 49152])
def test_topk_rows_equals_a_stable_sort(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(37, width, generator=g) * 3
    ties = torch.randint(-3, 3, (37, width), generator=g).float()  # few distinct values: ties at every boundary
    for k in sorted({1, min(2, width), min(51, width), min(65, width), width}):
        check(x, k)
        check(ties, k)
    wide = torch.randn(5, width + 9, generator=g)[:, 3 : 3 + width]  # rows with a larger stride
    check(wide, min(51, width))


def test_topk_rows_non_finite_and_ordered_rows():
    g = torch.Generator().manual_seed(0)
    n = 5000
    x = torch.randn(9, n, generator=g)
    x[0] = float("-inf")  # fewer than k finite scores: -inf entries fill the list, lowest index first
    x[1, : n - 3] = float("-inf")
    x[2, 17] = float("nan")  # NaN ranks above every number, as in torch.topk
    x[3, ::7] = float("nan")
    x[4, 100] = float("inf")
    x[5] = torch.arange(n, dtype=torch.float32)  # ascending: every score beats the ones before it
    x[6] = -torch.arange(n, dtype=torch.float32)
    x[7] = 1.5  # all equal
    x[8, ::2] = -0.0
    x[8, 1::2] = 0.0
    for k in (1, 10, 51, 600):
        check(x, k)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), width=st.integers(1, 700), data=st.data())
def test_topk_rows_on_random_small_integer_rows(rows, width, data):
    k = data.draw(st.integers(1, width))
    seed = data.draw(st.integers(0, 2**31 - 1))
    x = torch.randint(-4, 4, (rows, width), generator=torch.Generator().manual_seed(seed)).float()
    check(x, k)


def test_topk_rows_refuses_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="float32"):
        cpu.topk_rows(torch.zeros(2, 3, dtype=torch.float64), 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu.topk_rows(torch.zeros(3, 2).t(), 1)
    with pytest.raises(RuntimeError, match="k must be"):
        cpu.topk_rows(torch.zeros(2, 3), 4)
    with pytest.raises(RuntimeError, match="k must be"):
        cpu.topk_rows(torch.zeros(2, 3), 0)


def _rows(n: int) -> list[SamplingRow]:
    kinds = [dict(temperature=0.7, top_k=50), dict(temperature=0.9, top_k=0, top_p=0.9), dict(top_k=20, top_p=0.8),
             dict(temperature=1.0, top_k=0, typical_p=0.9), dict(top_k=40, logprobs=True, top_logprobs=5)]
    return [SamplingRow(SamplingParams(max_new_tokens=4, do_sample=True, **kinds[i % len(kinds)]), [1, 2], 1,
                        torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.mark.parametrize("peaked", [False, True])
def test_sampler_on_the_kernel_draws_what_it_draws_on_torch_topk(monkeypatch, peaked):
    """Top-k, top-p, typical and top lists through the kernel give the tokens and logprobs of torch.topk, seeded."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 32768, generator=g) * (8.0 if peaked else 2.0)
    calls = []
    real = cpu.topk_rows
    monkeypatch.setattr(cpu, "topk_rows", lambda s, k: calls.append((tuple(s.shape), k)) or real(s, k))
    got = Sampler(32768).sample(logits, _rows(40))
    assert ((8, 32768), 51) in calls and ((8, 32768), 41) in calls  # TopK's k + 1 candidates
    assert any(k == warpers.NUCLEUS_CANDIDATES + 1 for _, k in calls)  # the nucleus' best scores
    monkeypatch.setattr(warpers, "TOPK_KERNEL_MIN", 1 << 62)  # torch.topk everywhere
    calls.clear()
    want = Sampler(32768).sample(logits, _rows(40))
    assert not calls
    assert got.tokens == want.tokens
    assert got.logprobs == want.logprobs
    assert got.top_logprobs == want.top_logprobs
