"""The host sampler's C++ passes against torch: the row top-k (``kernels/csrc/topk_cpu.cpp``), the nucleus'
normaliser and mask (``kernels/csrc/sample_cpu.cpp``), and the sampler on them.

The top-k reference is a stable descending sort: the same values as ``torch.topk`` and the order the kernel
promises among equal scores (lower index first, NaN above every number).
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf
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
    # Mostly masked rows (a nucleus' bin, a banned vocabulary): fewer finite scores than k, or just more.
    masked = torch.full((3, 49152), float("-inf"))
    for r, count in enumerate((200, 400, 450)):
        at = torch.randperm(49152, generator=g)[:count]
        masked[r, at] = torch.randn(count, generator=g)
    check(masked, 400)


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
    calls, draws = [], []
    real, real_draw = cpu.topk_rows, cpu.cdf_draw
    monkeypatch.setattr(cpu, "topk_rows", lambda s, k: calls.append((tuple(s.shape), k)) or real(s, k))
    monkeypatch.setattr(cpu, "cdf_draw", lambda p, u: draws.append(tuple(p.shape)) or real_draw(p, u))
    got = Sampler(32768).sample(logits, _rows(40))
    assert ((8, 32768), 51) in calls and ((8, 32768), 41) in calls  # TopK's k + 1 candidates
    assert any(k == warpers.NUCLEUS_CANDIDATES + 1 for _, k in calls)  # the nucleus' best scores
    assert sorted(draws) == [(8, 32768), (8, 32768)]  # the top-p and the typical rows' draws
    monkeypatch.setattr(warpers, "TOPK_KERNEL_MIN", 1 << 62)  # torch.topk everywhere
    calls.clear()
    want = Sampler(32768).sample(logits, _rows(40))
    assert not calls
    assert got.tokens == want.tokens
    assert got.logprobs == want.logprobs
    assert got.top_logprobs == want.top_logprobs


def test_cut_below_equals_masked_fill():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3001, generator=g) * 3
    x[1, ::5] = float("-inf")
    x[2, 7] = float("nan")  # NaN is not below anything: kept, as masked_fill keeps it
    x[3, 9] = float("inf")
    thr = torch.tensor([0.0, 1.0, 2.0, 10.0, float("-inf"), float("inf"), float("nan")])
    got = cpu.cut_below(x, thr)
    want = x.masked_fill(x < thr.view(-1, 1), float("-inf"))
    assert torch.equal(got.nan_to_num(7.5), want.nan_to_num(7.5))
    wide = torch.randn(3, 3010, generator=g)[:, 5:3005]  # rows with a larger stride
    assert torch.equal(cpu.cut_below(wide, thr[:3]), wide.masked_fill(wide < thr[:3].view(-1, 1), float("-inf")))
    with pytest.raises(RuntimeError, match="one float32 threshold per row"):
        cpu.cut_below(x, thr[:3])


def test_max_sum_exp_equals_the_torch_normaliser():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 49157, generator=g) * 4
    x[1, ::2] = float("-inf")  # removed tokens add nothing (to float rounding)
    x[2] += 1000.0
    best, z = cpu.max_sum_exp(x[:3])
    assert torch.equal(best, x[:3].amax(-1))
    want = torch.exp(x[:3] - x[:3].amax(-1, keepdim=True)).sum(-1, dtype=torch.float64)
    torch.testing.assert_close(z, want, rtol=1e-6, atol=0.0)  # well inside NUCLEUS_OWN_ERROR (3e-7 of a mass)
    x[3, 11] = float("nan")
    x[4] = float("-inf")
    x[5, 3] = float("inf")
    best, z = cpu.max_sum_exp(x)
    assert best[3].isnan() and best[4] == float("-inf") and best[5] == float("inf")
    assert z[3:6].isnan().all() and not z[6:].isnan().any()  # a non-finite maximum: NaN, as torch's lse


@pytest.mark.parametrize("scale", [1.0, 2.0, 8.0])
def test_nucleus_on_the_kernels_equals_hf_and_the_torch_passes(monkeypatch, scale):
    """Peaked rows (decided among the candidates: one cut_below over the batch), flat rows (the bins) and odd
    rows: HF's TopPLogitsWarper bit for bit, on the C++ passes and without them."""
    g = torch.Generator().manual_seed(int(scale))
    x = torch.randn(12, 49152, generator=g) * scale
    x[1, ::3] = float("-inf")
    x[2] = float("-inf")
    x[3, 0] = float("nan")
    calls = []
    for name in ("cut_below", "max_sum_exp", "nucleus_bins"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    for rows in (x, x[4:]):  # with odd rows (some rows left to HF) and without
        for top_p in (0.5, 0.9, 0.95):
            calls.clear()
            got = warpers.nucleus(rows, top_p)
            assert "max_sum_exp" in calls and "cut_below" in calls
            if scale != 2.0:  # flat rows reach the bins; peaked ones are decided among the candidates
                assert ("nucleus_bins" in calls) == (scale == 1.0)
            want = tf.generation.logits_process.TopPLogitsWarper(top_p)(torch.empty(1, 0, dtype=torch.long), rows)
            assert torch.equal(got.nan_to_num(7.5), want.nan_to_num(7.5))
            with monkeypatch.context() as m:
                m.setattr(warpers, "TOPK_KERNEL_MIN", 1 << 62)
                m.setattr(warpers, "SORT_KERNEL_MIN", 1 << 62)
                assert torch.equal(warpers.nucleus(rows, top_p).nan_to_num(7.5), got.nan_to_num(7.5))


def _torch_draw(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """sampler._draw's searches for full-width fp32 rows, given the uniforms."""
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1, dtype=torch.float32)
    total = cdf[:, -1:]
    pos = torch.searchsorted(cdf, u.float().view(-1, 1) * total, right=True)
    last = torch.searchsorted(cdf, total.contiguous(), right=False)
    return torch.minimum(pos, last).clamp_(max=scores.shape[1] - 1).view(-1)


@pytest.mark.parametrize("keep", [1.0, 0.1, 0.001])
def test_cdf_draw_picks_what_torchs_cumsum_and_searches_pick(keep):
    """Bit for bit, on dense and cut rows, with uniforms that land exactly on CDF entries and at 0 and ~1."""
    g = torch.Generator().manual_seed(int(keep * 1000))
    for scale in (0.5, 3.0, 12.0):
        x = torch.randn(24, 20000, generator=g) * scale
        if keep < 1.0:
            x = x.masked_fill(torch.rand(x.shape, generator=g) > keep, float("-inf"))
            x[:, 5] = 1.0  # every row keeps a token
        probs = torch.softmax(x, dim=-1)
        cdf = probs.cumsum(dim=-1, dtype=torch.float32)
        at = torch.randint(0, x.shape[1], (24,), generator=g)
        on_entries = cdf.gather(1, at.view(-1, 1)).view(-1).double() / cdf[:, -1].double()
        for u in (torch.rand(24, dtype=torch.float64, generator=g), on_entries, torch.zeros(24, dtype=torch.float64),
                  torch.full((24,), 1 - 2**-53, dtype=torch.float64)):
            assert torch.equal(cpu.cdf_draw(probs, u), _torch_draw(x, u))


def test_cdf_draw_odd_rows():
    p = torch.zeros(3, 100)
    p[1, 7] = float("nan")
    p[2, 99] = 1.0
    assert cpu.cdf_draw(p, torch.full((3,), 0.5, dtype=torch.float64)).tolist() == [0, -1, 99]
    with pytest.raises(RuntimeError, match="one float64 uniform per row"):
        cpu.cdf_draw(p, torch.full((3,), 0.5))


def test_sampler_draw_with_a_nan_row_takes_torchs_searches_for_the_batch():
    from hf_paged.engine.sampler import _draw

    x = torch.randn(4, 40000, generator=torch.Generator().manual_seed(9)) * 3
    x = x.masked_fill(x < 6.0, float("-inf"))
    x[:, 0] = 9.0
    x[2, 3] = float("nan")
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    got = _draw(x, gens, cut=True)
    u = torch.cat([torch.rand(1, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    want = _torch_draw(x, u).tolist()
    assert got == want


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_nucleus_bins_decides_flat_rows_as_the_torch_bins_do(scale):
    """Flat rows (a nucleus of thousands of tokens): the C++ bins decide the rows the torch bins decide, at the
    same thresholds, and the cut at those thresholds is HF's TopP."""
    g = torch.Generator().manual_seed(int(scale * 10))
    x = torch.randn(16, 49152, generator=g) * scale
    best, z = cpu.max_sum_exp(x)
    lse = best.double() + z.log()
    for top_p in (0.5, 0.9, 0.95):
        margin = warpers.nucleus_margin(top_p, x.shape[1])
        ok, last = cpu.nucleus_bins(x, best, lse, top_p, margin, warpers.NUCLEUS_BINS, warpers.NUCLEUS_SPAN,
                                    warpers.NUCLEUS_MAX_BIN)
        rel = torch.exp(x - best.view(-1, 1))
        ok_t, last_t = warpers._cut_by_bins(x, best.view(-1, 1), rel.double() / z.view(-1, 1), lse.view(-1, 1),
                                            top_p, margin)
        # Near-uniform rows weigh ~1/vocab a token, so the margin leaves some to the sort, as the torch bins do.
        assert int(ok.sum()) >= 10, (scale, top_p)
        assert int((ok != ok_t.view(-1)).sum()) <= 1  # rounding may tip a row at the margin, no more
        both = ok & ok_t.view(-1)
        assert torch.equal(last[both], last_t.view(-1)[both])
        cut = cpu.cut_below(x[ok], last[ok])
        hf = tf.generation.logits_process.TopPLogitsWarper(top_p)(torch.empty(1, 0, dtype=torch.long), x[ok])
        assert torch.equal(cut, hf)
    with pytest.raises(RuntimeError, match="span_max > 0"):
        cpu.nucleus_bins(x, best, lse, 0.9, 1e-6, 1024, 0.0, 4096)


def test_sort_rows_equals_a_stable_torch_sort():
    """The radix sort: torch.sort(stable=True)'s values and indices (-0.0 before +0.0, which torch ranks equal
    and keeps in index order); a NaN row is flagged, not sorted."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 40000, generator=g) * 4
    x[1] = torch.randint(-5, 5, (40000,), generator=g).float()  # ties everywhere
    x[2, ::3] = float("-inf")
    x[3, 10], x[3, 20] = float("inf"), float("-inf")
    x[4] = torch.arange(40000, dtype=torch.float32).flip(0)  # descending
    x[5] = 2.5  # all equal
    x[6, 7] = float("nan")
    x[7] = 1.0 + x[7].abs() / (x[7].abs().max() * 3)  # all in [1, 1.5): the last pass, after two, has one bucket
    x[8, 5], x[8, 9] = -1e-40, 1e-40  # subnormals
    vals, idx, ok = cpu.sort_rows(x)
    assert ok.tolist() == [True] * 6 + [False] + [True] * 2
    assert torch.equal(idx[6], torch.arange(40000)) and torch.equal(vals[6].nan_to_num(7.5), x[6].nan_to_num(7.5))
    want_vals, want_idx = torch.sort(x, dim=-1, stable=True)
    for r in (0, 1, 2, 3, 4, 5, 7, 8):
        assert torch.equal(vals[r], want_vals[r]), r
        assert torch.equal(idx[r], want_idx[r]), r
    signed = torch.tensor([[0.0, -0.0, 1.0, -0.0, 0.0] * 7000])  # -0.0 first, then +0.0, each in index order
    vals, idx, ok = cpu.sort_rows(signed)
    zeros = idx[0, :28000].tolist()
    assert ok.all() and zeros == sorted(zeros, key=lambda i: (i % 5 not in (1, 3), i))
    assert torch.signbit(vals[0, :14000]).all() and not torch.signbit(vals[0, 14000:]).any()
    wide = torch.randn(3, 50000, generator=g)[:, 5:45005]  # strided rows
    assert torch.equal(cpu.sort_rows(wide)[1], torch.sort(wide, dim=-1, stable=True)[1])
    for empty in (torch.empty(0, 0), torch.empty(3, 0), torch.empty(0, 5)):
        vals, idx, ok = cpu.sort_rows(empty)
        assert vals.shape == idx.shape == empty.shape and ok.shape == (empty.shape[0],) and ok.all()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), width=st.integers(1, 3000), data=st.data())
def test_sort_rows_on_random_rows(rows, width, data):
    """Any width (one bucket or many, short rows), values drawn from a small set with both zeros and infinities."""
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([-float("inf"), -3.5, -1.0, -0.0, 0.0, 1e-42, 2.0, 1e30, float("inf")])
    x = pool[torch.randint(0, len(pool), (rows, width), generator=g)] + torch.randn(rows, width, generator=g) \
        * data.draw(st.sampled_from([0.0, 1e-3, 10.0]))
    vals, idx, ok = cpu.sort_rows(x)
    assert ok.all()
    want_vals, want_idx = torch.sort(x, dim=-1, stable=True)
    assert torch.equal(vals, want_vals)  # ==: -0.0 and 0.0 compare equal, as torch ranks them
    assert torch.equal(idx.sort(dim=-1).values, torch.arange(width).expand(rows, width))  # a permutation
    assert torch.equal(x.gather(1, idx), vals)
    assert torch.equal(torch.signbit(x.gather(1, idx)), torch.signbit(vals))
    same = (vals[:, 1:] == vals[:, :-1]) & (torch.signbit(vals[:, 1:]) == torch.signbit(vals[:, :-1]))
    assert bool((idx[:, 1:] > idx[:, :-1])[same].all())  # equal scores in index order


@pytest.mark.parametrize("vocab", [1024, 32000])
def test_sorted_nucleus_single_small_rows(monkeypatch, vocab):
    """One undecided row of a small vocabulary takes the radix sort too (SORT_KERNEL_MIN), and equals HF."""
    sorts = []
    real = cpu.sort_rows
    monkeypatch.setattr(cpu, "sort_rows", lambda x: sorts.append(x.shape) or real(x))
    x = torch.randn(1, vocab, generator=torch.Generator().manual_seed(vocab)) * 0.05
    for top_p in (0.5, 0.9):
        want = tf.generation.logits_process.TopPLogitsWarper(top_p)(torch.empty(1, 0, dtype=torch.long), x)
        assert torch.equal(warpers._sorted_nucleus(x, top_p), want)
        assert torch.equal(warpers.nucleus(x, top_p), want)
    assert sorts and all(s == (1, vocab) for s in sorts)


@pytest.mark.parametrize("kind", ["flat", "ties", "signed zeros", "odd"])
def test_sorted_nucleus_equals_hf(monkeypatch, kind):
    """The rows the nucleus leaves to HF's sort, on the radix sort: HF's TopPLogitsWarper bit for bit, with
    HF's own warper only for the rows where equal scores straddle the cut (and NaN rows)."""
    g = torch.Generator().manual_seed(len(kind))
    x = torch.randn(8, 49152, generator=g) * 0.05  # near-uniform: a nucleus of most of the vocabulary
    if kind == "ties":
        x = (x * 40).round() / 40  # ~30 distinct scores: a tie group at every cut
    elif kind == "signed zeros":
        x = (x * 40).round()  # 0.0 and -0.0 both
    elif kind == "odd":
        x[0, ::2] = float("-inf")
        x[1] = float("-inf")
        x[2, 3] = float("nan")
        x[3, 9] = float("inf")
        x[4] = 1.0
    redone = []
    hf_warper = warpers.TopPLogitsWarper

    def counting(top_p):
        w = hf_warper(top_p)
        return lambda ids, s: redone.append(s.shape[0]) or w(ids, s)

    monkeypatch.setattr(warpers, "TopPLogitsWarper", counting)
    for top_p in (0.3, 0.9, 0.95, 0.999, 1.0):
        redone.clear()
        got = warpers._sorted_nucleus(x, top_p)
        want = hf_warper(top_p)(torch.empty(1, 0, dtype=torch.long), x)
        assert torch.equal(got.nan_to_num(7.5), want.nan_to_num(7.5)), (kind, top_p)
        if kind == "flat":
            assert not redone  # no tie at the cut: every row through the radix sort
        elif kind == "odd":
            assert sum(redone) <= 2  # the NaN row, and at most the all-equal row's tied cut
    got = warpers.nucleus(x, 0.9)  # the whole nucleus, its undecided rows included
    assert torch.equal(got.nan_to_num(7.5), hf_warper(0.9)(torch.empty(1, 0, dtype=torch.long), x).nan_to_num(7.5))
