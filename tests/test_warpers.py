"""Top-p and typical-p without sorting the vocabulary (engine/warpers.py): HF's warpers' tensors, bit for
bit, with most rows decided without HF's sort, and the same seeded tokens."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from hf_paged.engine.params import SamplingParams
from hf_paged.engine.sampler import Sampler, SamplingRow

_NO_IDS = torch.empty(1, 0, dtype=torch.long)


def params(**kw) -> SamplingParams:
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("eos_token_id", [2])
    return SamplingParams(**kw)


# ---------------------------------------------------------------------------------- nucleus (top-p) without a sort
def _nucleus_calls(monkeypatch):
    """Rows that nucleus() left to HF's sorting warper (counted)."""
    import hf_paged.engine.warpers as warpers_mod

    sorted_rows = []

    class Counting(tf.generation.logits_process.TopPLogitsWarper):
        def __call__(self, input_ids, scores):
            sorted_rows.append(scores.shape[0])
            return super().__call__(input_ids, scores)

    monkeypatch.setattr(warpers_mod, "TopPLogitsWarper", Counting)
    return sorted_rows


def _hf_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    return tf.generation.logits_process.TopPLogitsWarper(top_p)(torch.empty(1, 0, dtype=torch.long), scores)


@pytest.mark.parametrize("vocab", [2, 256, 5003, 49152])
def test_nucleus_equals_hf_top_p(monkeypatch, vocab):
    """The same tensor as TopPLogitsWarper, bit for bit: peaked, flat and near-uniform rows, ties,
    banned (-inf) tokens, a NaN row, an all -inf row, a row with fewer finite tokens than candidates,
    top_p from 0.01 to 1 - 1e-9; most rows decided without HF's sort."""
    from hf_paged.engine.warpers import nucleus

    sorted_rows = _nucleus_calls(monkeypatch)
    g = torch.Generator().manual_seed(vocab)
    for scale in (0.05, 1.0, 4.0, 20.0):
        x = torch.randn(6, vocab, generator=g) * scale
        x[1] = (x[1] * 2).round() / 2  # many ties
        x[2, ::3] = -float("inf")
        x[3, 1:] = -float("inf") if vocab > 40 else x[3, 1:]
        x[3, :min(vocab, 30)] = torch.randn(min(vocab, 30), generator=g)
        x[4] = -float("inf")
        x[5, 0] = float("nan")
        for top_p in (0.01, 0.3, 0.9, 0.95, 0.999, 1 - 1e-9):
            got, want = nucleus(x, top_p), _hf_top_p(x, top_p)
            assert torch.equal(torch.isnan(got), torch.isnan(want)), (scale, top_p)
            assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)), (scale, top_p)
        if vocab > 2 and scale >= 1:  # finite rows at an everyday top_p: decided without the sort (on a
            # near-uniform row the boundary tokens weigh ~1/vocab, and HF's rounding may decide it)
            sorted_rows.clear()
            for top_p in (0.3, 0.9):
                assert torch.equal(nucleus(x[:4], top_p), _hf_top_p(x[:4], top_p))
            assert sum(sorted_rows) <= 2, (scale, sorted_rows)


def test_nucleus_decides_without_sorting(monkeypatch):
    """Peaked rows are decided among the best candidates, flatter ones by the score bins: none is sorted.
    (Otherwise the equality above would hold by falling back every time.)"""
    from hf_paged.engine.warpers import nucleus

    sorted_rows = _nucleus_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(16, 49152, generator=g) * 8  # a nucleus of a few tokens: the candidates
    flat = torch.randn(16, 49152, generator=g) * 2  # thousands of tokens: the bins
    assert torch.equal(nucleus(peaked, 0.9), _hf_top_p(peaked, 0.9))
    assert sorted_rows == []
    for top_p in (0.5, 0.9):
        assert torch.equal(nucleus(flat, top_p), _hf_top_p(flat, top_p))
    # A flat row's boundary tokens weigh ~1e-5, so the margin against HF's rounding leaves a few to the sort.
    assert sum(sorted_rows) <= 6, sorted_rows


def test_nucleus_leaves_the_boundary_cases_to_hf(monkeypatch):
    """A row whose mass reaches top_p exactly at a token (HF's rounding decides) or whose boundary
    falls between two tied scores (HF's sort order decides) goes through HF's warper."""
    from hf_paged.engine.warpers import nucleus

    sorted_rows = _nucleus_calls(monkeypatch)
    exact = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))  # S_2 = 0.75 = top_p
    assert torch.equal(nucleus(exact, 0.75), _hf_top_p(exact, 0.75))
    assert sorted_rows == [1]
    tied = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0]])
    p = torch.softmax(tied, -1)
    top_p = float(p[0, 0] + p[0, 1]) + 1e-3  # the boundary falls inside the run of 1.0s
    assert torch.equal(nucleus(tied, top_p), _hf_top_p(tied, top_p))
    assert sorted_rows == [1, 1]


_SEEDED_KINDS = {
    "top_p": [dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_p=0.95),
              dict(temperature=1.3, top_p=0.5, min_p=0.05), dict(temperature=0.8, top_p=0.9, typical_p=0.9)],
    "typical": [dict(temperature=0.7, typical_p=0.9), dict(temperature=1.0, typical_p=0.95),
                dict(temperature=1.0, typical_p=0.2, min_p=0.05), dict(temperature=0.8, top_p=0.95, typical_p=0.5)],
}


@pytest.mark.parametrize("kind", sorted(_SEEDED_KINDS))
def test_sampling_tokens_unchanged_without_the_sort(monkeypatch, kind):
    """Seeded top-p and typical-p rows (no top_k, as OpenAI and TGI clients send; alone and with min-p or each
    other) draw the same tokens with the new paths on and off."""
    import hf_paged.engine.warpers as warpers_mod

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 5003, generator=g) * torch.tensor([0.5, 2.0, 6.0]).repeat(4).view(-1, 1)
    kinds = _SEEDED_KINDS[kind]

    def run() -> list[int]:
        rows = [SamplingRow(params(do_sample=True, top_k=0, seed=5, **kinds[i % 4]), [1, 2, 3], 0,
                            torch.Generator().manual_seed(100 + i)) for i in range(12)]
        return Sampler(5003).sample(logits, rows).tokens

    new = run()
    monkeypatch.setattr(warpers_mod, "NUCLEUS_CANDIDATES", 0)
    assert run() == new


# ---------------------------------------------------------------------------------- typical-p without a sort
def _typical_calls(monkeypatch):
    """Rows that typical() left to HF's sort (counted)."""
    import hf_paged.engine.warpers as warpers_mod

    sorted_rows = []
    real = warpers_mod._typical_sorted
    monkeypatch.setattr(warpers_mod, "_typical_sorted", lambda s, *a: sorted_rows.append(s.shape[0]) or real(s, *a))
    return sorted_rows


def _hf_typical(scores: torch.Tensor, mass: float) -> torch.Tensor:
    return tf.generation.logits_process.TypicalLogitsWarper(mass)(_NO_IDS, scores)


def _assert_same(got: torch.Tensor, want: torch.Tensor, msg="") -> None:
    assert torch.equal(torch.isnan(got), torch.isnan(want)), msg
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)), msg


@pytest.mark.parametrize("vocab", [2, 7, 256, 5003, 49152])
def test_typical_equals_hf(monkeypatch, vocab):
    """The same tensor as TypicalLogitsWarper, bit for bit: peaked, flat and near-uniform rows, ties,
    banned (-inf) tokens, a NaN row, an all -inf row, a row with fewer finite tokens than candidates,
    typical_p from 0.01 to 0.999; peaked rows decided without HF's sort."""
    from hf_paged.engine.warpers import typical

    sorted_rows = _typical_calls(monkeypatch)
    g = torch.Generator().manual_seed(vocab)
    for scale in (0.05, 1.0, 4.0, 20.0):
        x = torch.randn(6, vocab, generator=g) * scale
        x[1] = (x[1] * 2).round() / 2  # many ties (of score, so of distance)
        x[2, ::3] = -float("inf")
        x[3, 1:] = -float("inf") if vocab > 40 else x[3, 1:]
        x[3, :min(vocab, 30)] = torch.randn(min(vocab, 30), generator=g)
        x[4] = -float("inf")
        x[5, 0] = float("nan")
        for mass in (0.01, 0.2, 0.5, 0.9, 0.95, 0.999):
            _assert_same(typical(x, mass), _hf_typical(x, mass), (scale, mass))
    if vocab > 7:
        peaked = torch.randn(8, vocab, generator=g) * 8
        sorted_rows.clear()
        for mass in (0.2, 0.9, 0.95):
            _assert_same(typical(peaked, mass), _hf_typical(peaked, mass), mass)
        assert sum(sorted_rows) <= 1, sorted_rows


def test_typical_decides_wide_sets_by_bins(monkeypatch):
    """Sets wider than the candidates (thousands of tokens) are decided in distance bins, most rows
    without HF's sort (otherwise the equality above would hold by falling back every time)."""
    import hf_paged.engine.warpers as warpers_mod

    sorted_rows = _typical_calls(monkeypatch)
    binned = []
    by_bins = warpers_mod._typical_by_bins
    monkeypatch.setattr(warpers_mod, "_typical_by_bins", lambda *a: binned.append(a[0].shape[0]) or by_bins(*a))
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(16, 49152, generator=g) * 3
    for mass in (0.2, 0.5):
        got = warpers_mod.typical(flat, mass)
        _assert_same(got, _hf_typical(flat, mass), mass)
        kept = int(torch.isfinite(got).sum(-1).min())
        assert kept > warpers_mod.NUCLEUS_CANDIDATES + 1, kept  # too wide for the candidates
    assert sum(binned) == 32, binned  # every row reached the bins
    assert sum(sorted_rows) <= 8, sorted_rows  # HF's rounding margin leaves a few


def test_typical_leaves_the_boundary_cases_to_hf(monkeypatch):
    """A row whose cumulative mass reaches typical_p exactly at a token (HF's rounding decides) goes through
    HF's warper; a tie group across the boundary is decided without it (HF keeps the whole group)."""
    from hf_paged.engine.warpers import typical

    sorted_rows = _typical_calls(monkeypatch)
    # p = [1/2, 1/4, 1/8, 1/8]: H = 1.75 ln 2, typical order 1, 0, {2, 3} with cumulative 1/4, 3/4, 1.
    exact = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    _assert_same(typical(exact, 0.75), _hf_typical(exact, 0.75))
    assert sorted_rows == [1]
    tied = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 2))
    want = _hf_typical(tied, 0.8)  # the boundary falls inside the tied pair {2, 3}: both kept
    assert torch.isfinite(want).all()
    _assert_same(typical(tied, 0.8), want)
    assert sorted_rows == [1]
    # 199 tokens tied at the nearest distance, one far: topk lists 65 of the group, whose mass already passes
    # 0.2; the threshold is the group's distance, so all 199 stay (as in HF), none sorted.
    wide = torch.zeros(1, 200)
    wide[0, 0] = 3.0
    want = _hf_typical(wide, 0.2)
    assert int(torch.isfinite(want).sum()) == 199
    _assert_same(typical(wide, 0.2), want)
    assert sorted_rows == [1]



def test_typical_equals_hf_on_bf16_rounded_rows():
    """Logits of a bf16 model come as fp32 rows of tied scores, and HF's normaliser over a tie group in
    typical order rounds alike many times: its sums came out too small by ~5e-6 here (a one-sided margin
    kept 12 tokens fewer than HF). Also after top-p, as the sampler runs them, and with two threads (HF's
    entropy of a row alone differs by an ulp: the rows left to the sort use the batch's distances)."""
    from hf_paged.engine.warpers import nucleus, typical

    rows = []
    for seed in (5, 4):
        torch.manual_seed(seed)
        x = torch.randn(1, 151936) * 1.5
        x[0, :20] += torch.rand(20) * 6
        rows.append(x.bfloat16().float())
    x = torch.cat(rows)
    after_top_p = nucleus(x, 0.95)
    for mass in (0.7424814, 0.790188, 0.88, 0.94):
        _assert_same(typical(x, mass), _hf_typical(x, mass), mass)
        _assert_same(typical(after_top_p, mass), _hf_typical(after_top_p, mass), mass)
        for i in range(2):  # each row alone too
            _assert_same(typical(x[i:i + 1], mass), _hf_typical(x[i:i + 1], mass), mass)
            _assert_same(typical(after_top_p[i:i + 1], mass), _hf_typical(after_top_p[i:i + 1], mass), mass)


def test_typical_rows_left_to_the_sort_keep_the_batch_distances():
    """With two threads HF's entropy of a single row (a sum split between threads) can differ by an ulp from
    the same row's in the batch; a row left to the sort must get HF's result on the batch."""
    from hf_paged.engine.warpers import typical

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        for _ in range(3):
            x = torch.randn(2, 151936) * 2
        mass = 0.0006554255960509181  # the second row's boundary within HF's rounding: left to the sort
        _assert_same(typical(x, mass), _hf_typical(x, mass))
    finally:
        torch.set_num_threads(threads)
