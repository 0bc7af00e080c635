"""Sampling warpers shared by both samplers: top-p and typical-p without sorting the vocabulary, and the
device sampler's per-row TopP, MinP and Typical (HF's warpers with one setting per row, vectorised).

Top-p is the setting OpenAI and TGI clients send (with a temperature, no top-k), and HF's
``TopPLogitsWarper`` sorts every row for it: ~1.9 ms a row of 49152 scores on a CPU core. HF keeps the
``J`` best tokens, ``J`` the first whose preceding mass reaches ``top_p``, so only the row's ``J``-th
score is needed; :func:`nucleus` finds it among the row's best candidates or in score bins, and leaves to
HF's sort only the rows whose boundary is within HF's own rounding. :func:`top_p_rows` is the same
decision on a device, with no host sync: the rows it leaves go to the Triton bisection
(``kernels/sampling.py``) or to the sort.

Example::

    warped = nucleus(scores / temperature, top_p=0.9)      # == TopPLogitsWarper(0.9)(ids, scores / t)
    warped = typical(scores, 0.9)                          # == TypicalLogitsWarper(0.9)(ids, scores)
    warped = top_p_rows(scores_on_gpu, [0.9, 0.95], kernel=True)
"""
from __future__ import annotations

import torch
from transformers.generation.logits_process import TopPLogitsWarper, TypicalLogitsWarper

from ..kv.metadata import to_device

_NEG_INF = -float("inf")
_NO_IDS = torch.empty(1, 0, dtype=torch.long)  # the warpers never read input_ids


# Nucleus (top-p) without a full sort (see nucleus): the best candidates looked at first; the bins of the
# second pass, spread evenly over the row's range of scores but over NUCLEUS_SPAN nats at most (the last
# bin then takes everything further down); the most tokens a bin may hold for its tokens to be ordered
# by topk rather than the whole row sorted.
NUCLEUS_CANDIDATES = 64  # 0: off, HF's sort for every row (benchmarks/nucleus.py's base)
NUCLEUS_BINS, NUCLEUS_SPAN, NUCLEUS_MAX_BIN = 1024, 32.0, 4096
# How far a mass sum must be from top_p to be decided without HF's own rounding. HF compares its fp32
# cumulative probabilities (softmax, then a cumsum accumulated in double on CPU) with 1 - top_p; they were
# off by a relative 1.0e-6, 3.7e-6 and 9.6e-6 at most, on rows of 49152, 151936 and 262144 tokens from
# near-uniform to peaked: so (1 - top_p) times NUCLEUS_REL_ERROR per token of the row (4-7x those), plus
# NUCLEUS_OWN_ERROR for ours (fp32 exp of each score, summed in float64). This bounds what was measured,
# not every row: a row whose tail is one score repeated ~150K times puts HF's fp32 normaliser off by ~1e-4
# (each add rounds the same way), and its nucleus may then differ from HF's by a token at the boundary.
NUCLEUS_REL_ERROR, NUCLEUS_OWN_ERROR = 1.5e-10, 3e-7
# Typical: HF compares its cumulative probabilities in typical order with the mass, and its softmax sums a
# row in that order, large probabilities mid-row, so many small ones are added to large lane sums. Its
# sums were off by up to 3.6e-10 relative per finite token of the row (1.4e-5 at 49152 tokens, 5.4e-5 at
# 151936, on Gaussian and Gumbel rows; 1.65e-5 on the default model's logits at temperature 1; 1.3e-5 on
# bf16-rounded rows of 151936, whose tie groups round alike): the margin is ~4x that, relative to the mass,
# on both sides. A -inf token adds an exact 0, so only finite tokens count. This bounds what was measured,
# not every row: two large scores and one score repeated ~150K times put HF's normaliser off by ~5e-4.
TYPICAL_REL_ERROR = 1.5e-9
# torch.topk on CPU takes ~90 us a row of 49152 scores (a partial sort), most of a sampled step; the C++
# kernel (kernels/csrc/topk_cpu.cpp) takes two streaming passes, 4-5x less. The nucleus' normaliser and mask
# also have C++ passes (kernels/csrc/sample_cpu.cpp). Below this many scores torch's calls are as fast.
TOPK_KERNEL_MIN = 1 << 15
# The radix sort (cpu.sort_rows) of the nucleus' undecided rows: one row of 1000 scores 27 vs 30 us for
# torch.sort, of 4096 120 vs 363 us, of 32000 0.94 vs 3.8 ms (single rows, this 2-core machine).
SORT_KERNEL_MIN = 1 << 10


def _kernel_rows(scores: torch.Tensor, least: int | None = None):
    """The C++ CPU kernels' module where they can take these ``[R, V]`` scores (fp32 CPU rows of unit stride,
    at least ``least`` scores in all, TOPK_KERNEL_MIN by default: enough for a call to pay); else None."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2 \
            and scores.stride(-1) == 1 and scores.numel() >= (TOPK_KERNEL_MIN if least is None else least):
        from ..kernels import cpu

        if cpu.available():
            return cpu
    return None


def topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=-1)`` of ``[R, V]`` scores as ``(values, indices)``, best first: by the C++
    kernel for fp32 CPU rows (the same values; among equal scores the lower index first, and kept at the
    boundary, where torch leaves the order open), else by torch."""
    fast = _kernel_rows(scores) if 1 <= k and 8 * k <= scores.shape[-1] else None
    return fast.topk_rows(scores, k) if fast else torch.topk(scores, k, dim=-1)


def nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``TopPLogitsWarper(top_p)(ids, scores)`` on ``[G, V]`` float scores, out of place, the same
    tensor (bit for bit on every row tested; see NUCLEUS_REL_ERROR for the limit), without sorting
    every row.

    HF sorts a row ascending and removes each token whose cumulative probability is ``<= 1 - top_p``
    (the best token always stays). In descending order, token ``j`` stays iff the mass of the tokens
    before it, ``S_j``, is ``< top_p``: the nucleus is the ``J`` best tokens, and only the ``J``-th
    score, the row's threshold, has to be found.

    - First among the row's ``NUCLEUS_CANDIDATES + 1`` best scores (:func:`topk`), which hold the
      nucleus of a peaked row; the row's normaliser takes one pass.
    - A flatter row adds each token's probability into bins by its score (``scatter_add``), finds the
      bin where the mass reaches ``top_p``, and orders that bin's tokens only.
    - A row is decided only when the mass before its last kept token and before its first removed one
      are both far enough from ``top_p`` that no rounding of HF's could flip either (see
      ``NUCLEUS_REL_ERROR``), and those two scores differ (of two tied tokens HF keeps one, by sort
      order). Other rows (a boundary within the margin, a tie there, a crowded bin, non-finite scores)
      go through HF's warper."""
    if not NUCLEUS_CANDIDATES or scores.dtype not in (torch.float32, torch.float64):  # the margin is for fp32
        return TopPLogitsWarper(top_p)(_NO_IDS, scores)
    g, vocab = scores.shape
    margin = nucleus_margin(top_p, vocab)
    fast = _kernel_rows(scores)
    if fast:  # the normaliser in one C++ pass (and the bins below in C++ too)
        best, z = (t.view(-1, 1) for t in fast.max_sum_exp(scores))
        rel, lse = None, best.double() + z.log()
    else:
        best, rel, z, lse = _normaliser(scores)
    # Each decided row's threshold; NaN (nothing is below it) for the rest, which HF's warper overwrites.
    thr = torch.full((g,), float("nan"), dtype=scores.dtype, device=scores.device)
    finite = torch.isfinite(lse).view(-1)
    todo = finite.nonzero().view(-1)
    if len(todo) and vocab > 1:
        sub = scores.index_select(0, todo) if len(todo) < g else scores
        vals = topk(sub, min(NUCLEUS_CANDIDATES + 1, vocab))[0]
        ok, last = nucleus_cut(vals, lse[todo], torch.zeros_like(lse[todo]), top_p, vals.shape[1], False, margin)
        thr[todo[ok]] = last[ok].view(-1)
        todo = todo[~ok]
    if len(todo) and vocab > 1:
        sub = scores.index_select(0, todo)
        if fast:  # the bins' decision in C++ (two passes and a sort of one bin a row; the same margins)
            ok, last = fast.nucleus_bins(sub, best[todo], lse[todo], top_p, margin, NUCLEUS_BINS, NUCLEUS_SPAN,
                                         NUCLEUS_MAX_BIN)
        else:
            ok, last = _cut_by_bins(sub, best[todo], rel[todo].double() / z[todo], lse[todo], top_p, margin)
        thr[todo[ok]] = last[ok].view(-1)
        todo = todo[~ok]
    if not bool(finite.all()):  # NaN or all -inf rows
        todo = torch.cat([todo, (~finite).nonzero().view(-1)])
    # Every score below its row's threshold removed: one pass over the batch.
    out = fast.cut_below(scores, thr) if fast else scores.masked_fill(scores < thr.view(-1, 1), _NEG_INF)
    if len(todo):
        out[todo] = _sorted_nucleus(scores.index_select(0, todo), top_p)
    return out


def _sorted_nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``TopPLogitsWarper(top_p)(ids, scores)``, HF's own ops, with fp32 CPU rows sorted by the C++ radix sort
    (~5x faster than torch.sort a row): the same sorted scores (but for the signs of equal zeros, which
    change no exp), so the same softmax, cumulative sums and cut position. Only the order of equal scores may
    differ from torch.sort's, and it decides which of them is removed only where a group of equal scores
    straddles the cut: such rows (and NaN rows) take HF's warper."""
    fast = _kernel_rows(scores, SORT_KERNEL_MIN)
    if not fast:
        return TopPLogitsWarper(top_p)(_NO_IDS, scores)
    vals, idx, ok = fast.sort_rows(scores)
    remove = vals.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    straddle = ((remove[:, 1:] != remove[:, :-1]) & (vals[:, 1:] == vals[:, :-1])).any(dim=-1)
    out = scores.masked_fill(remove.scatter(1, idx, remove), _NEG_INF)
    redo = (straddle | ~ok).nonzero().view(-1)
    if len(redo):
        out[redo] = TopPLogitsWarper(top_p)(_NO_IDS, scores.index_select(0, redo))
    return out


def top_p_straddles(candidates: torch.Tensor, cut: float | torch.Tensor) -> torch.Tensor:
    """Rows of TopK survivors ``[R, C]`` (any order, -inf padding) whose TopP cut (``cut`` = 1 - top_p, or an
    ``[R, 1]`` column, -1 for no top-p) falls among equal scores: HF's sort of the whole row decides which go."""
    remove = (ascending := candidates.sort(dim=-1).values).softmax(dim=-1).cumsum(dim=-1) <= cut
    remove[..., -1:] = False
    return ((remove[:, 1:] != remove[:, :-1]) & (ascending[:, 1:] == ascending[:, :-1])).any(dim=-1)


def nucleus_margin(top_p, vocab: int):
    """How far from ``top_p`` a mass sum must be to be decided (see NUCLEUS_REL_ERROR); ``top_p`` a float
    or a column tensor."""
    return (1.0 - top_p) * max(2e-6, NUCLEUS_REL_ERROR * vocab) + NUCLEUS_OWN_ERROR


def nucleus_cut(vals: torch.Tensor, lse: torch.Tensor, base: torch.Tensor, top_p: float | torch.Tensor,
                count: torch.Tensor | int, exhaustive: bool,
                margin: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the nucleus ends among ``vals`` ``[R, C]`` (descending; the first ``count`` of each row are
    real, the rest -inf padding): ``(decided [R], threshold [R, 1])``. ``base``: the mass of the tokens
    better than ``vals`` (``[R, 1]`` float64); ``exhaustive``: every token not listed below the listed
    ones scores strictly lower (a whole bin), so the first removed token may be the one after them;
    ``margin``: see NUCLEUS_REL_ERROR. ``top_p`` and ``margin`` may be ``[R, 1]`` columns. No host sync."""
    mass = torch.exp(vals.double() - lse)
    before = base + mass.cumsum(dim=-1) - mass  # S_j of each listed token
    after = base + mass.sum(dim=-1, keepdim=True)  # S of the first token not listed
    cols = torch.arange(vals.shape[1], device=vals.device).view(1, -1)
    if isinstance(count, torch.Tensor):
        count = count.view(-1, 1)
    real = cols < count  # an int count stays on the host: no copy to wait for
    n_keep = ((before < top_p) & real).sum(dim=-1, keepdim=True)  # J
    at = n_keep.clamp(min=1)
    nxt_in = n_keep < count  # the first removed token is listed
    nxt = nxt_in & (at < vals.shape[1])
    s_next = torch.where(nxt, before.gather(1, at.clamp(max=vals.shape[1] - 1)), after)
    s_last = before.gather(1, (at - 1).clamp(max=vals.shape[1] - 1))
    last = vals.gather(1, (at - 1).clamp(max=vals.shape[1] - 1))
    untied = ~nxt | (last > vals.gather(1, at.clamp(max=vals.shape[1] - 1)))
    ok = ((n_keep >= 1) & (nxt_in | exhaustive) & (s_next >= top_p + margin) & (s_last <= top_p - margin)
          & untied & torch.isfinite(last))
    return ok.view(-1), last


def _cut_by_bins(sub: torch.Tensor, best: torch.Tensor, prob: torch.Tensor, lse: torch.Tensor,
                 top_p: float, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nucleus_cut` for flat rows (``best``: each row's top score, ``prob`` its probabilities in float64):
    bin every token by its score, find the bin where the mass passes ``top_p`` and order only its tokens."""
    r, vocab = sub.shape
    nb = NUCLEUS_BINS
    span = (best - sub.amin(dim=-1, keepdim=True)).clamp_(min=1e-6, max=NUCLEUS_SPAN)  # a -inf score: the most
    bins = (best - sub).mul_((nb - 1) / span).clamp_(max=nb - 1).long()  # monotone in the score, row by row
    mass = torch.zeros(r, nb, dtype=torch.float64, device=sub.device).scatter_add_(1, bins, prob)
    cum = mass.cumsum(dim=-1)
    crossing = (cum < top_p).sum(dim=-1, keepdim=True).clamp_(max=nb - 1)  # the bin where the mass passes top_p
    base = torch.where(crossing > 0, cum.gather(1, (crossing - 1).clamp(min=0)), torch.zeros_like(lse))
    inside = bins == crossing
    count = inside.sum(dim=-1)
    width = int(count.max())
    if width > NUCLEUS_MAX_BIN:  # those rows are left to the sort
        crowded = count > NUCLEUS_MAX_BIN
        inside &= ~crowded.view(-1, 1)
        count = count.masked_fill(crowded, 0)
        width = int(count.max())
    if width == 0:  # every row crowded, or its mass never reached top_p (rounding, top_p ~ 1)
        return torch.zeros(r, dtype=torch.bool, device=sub.device), best
    vals = topk(sub.masked_fill(~inside, -float("inf")), width)[0]
    ok, last = nucleus_cut(vals, lse, base, top_p, count, True, margin)
    return ok & (count > 0), last


def typical(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """``TypicalLogitsWarper(mass)(ids, scores)`` on ``[G, V]`` float scores, out of place, the same tensor,
    without sorting every row (the decision of :func:`nucleus`, on HF's typical order).

    HF orders a row by each token's distance from the row's entropy, ``|-log p - H|`` (the ``shifted``
    values, computed here with HF's own ops, so bit for bit its values), finds ``J``, the first position
    where the cumulative probability reaches ``mass``, and removes every token whose distance is greater
    than the ``J``-th's. A row is decided by the tokens that share that distance (a tie group needs no sort
    order): the mass before the group and through it must be farther from ``mass`` than HF's rounding (see
    TYPICAL_REL_ERROR). They are looked for among the ``NUCLEUS_CANDIDATES + 1`` nearest tokens, then in
    distance bins; other rows (a boundary within the margin, a crowded bin, non-finite scores) take HF's
    sort, from the distances of the whole batch (HF's entropy of one row alone may differ by an ulp: its
    sum is split between threads)."""
    hf = TypicalLogitsWarper(mass)  # (checks the mass)
    if not NUCLEUS_CANDIDATES or scores.dtype not in (torch.float32, torch.float64):
        return hf(_NO_IDS, scores)
    g, vocab = scores.shape
    shifted = _typical_distances(scores)
    _, rel, z, lse = _normaliser(scores)
    tokens = torch.isfinite(scores).sum(dim=-1, keepdim=True, dtype=torch.float64)
    margin = mass * (tokens * TYPICAL_REL_ERROR).clamp_(min=2e-6) + NUCLEUS_OWN_ERROR
    finite = torch.isfinite(lse).view(-1)  # then a token's distance is finite, or +inf for a -inf score
    out = torch.empty_like(scores)
    todo = finite.nonzero().view(-1)
    if len(todo) and vocab > 1:
        sub = shifted.index_select(0, todo) if len(todo) < g else shifted
        near = min(NUCLEUS_CANDIDATES + 1, vocab)
        neg, idx = topk(sub.neg(), near)  # the nearest tokens, ascending distance
        probs = torch.exp(scores.index_select(0, todo).gather(1, idx).double() - lse[todo])
        ok, thr = _typical_cut(neg.neg(), probs, torch.zeros_like(lse[todo]), mass, near, margin[todo])
        todo = _mask_far(out, scores, shifted, todo, ok, thr)
    if len(todo) and vocab > 1:
        ok, thr = _typical_by_bins(shifted.index_select(0, todo), rel[todo].double() / z[todo], mass, margin[todo])
        todo = _mask_far(out, scores, shifted, todo, ok, thr)
    if not bool(finite.all()):  # NaN or all -inf rows
        todo = torch.cat([todo, (~finite).nonzero().view(-1)])
    if len(todo):
        out[todo] = _typical_sorted(scores.index_select(0, todo), shifted.index_select(0, todo), mass)
    return out


def _typical_cut(dist: torch.Tensor, probs: torch.Tensor, base: torch.Tensor, mass: float, count: torch.Tensor | int,
                 margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a typical set ends among ``dist`` ``[R, C]`` (ascending distances, the first ``count`` real;
    ``probs`` their float64 probabilities, ``base`` the mass of the tokens nearer than all of them):
    ``(decided [R], largest kept distance [R, 1])``. Tokens of the threshold's distance that are not
    listed (topk cut a tie) only add to the mass through it, so the decision holds for them too."""
    cols = torch.arange(dist.shape[1], device=dist.device).view(1, -1)
    if isinstance(count, torch.Tensor):
        count = count.view(-1, 1)
    real = cols < count
    probs = probs * real
    cum = base + probs.cumsum(dim=-1)
    at = ((cum < mass) & real).sum(dim=-1, keepdim=True)  # HF's J: the first listed token reaching mass
    found = at < count
    thr = dist.gather(1, at.clamp(max=dist.shape[1] - 1))
    before = base + (probs * (dist < thr)).sum(dim=-1, keepdim=True)  # the mass nearer than J's tie group
    through = base + (probs * (dist <= thr)).sum(dim=-1, keepdim=True)  # ... and with it
    ok = found & torch.isfinite(thr) & (before <= mass - margin) & (through >= mass + margin)
    return ok.view(-1), thr


def _typical_by_bins(dist: torch.Tensor, prob: torch.Tensor, mass: float,
                     margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_typical_cut` for rows whose set is wider than the candidates: bin every token by its
    distance (a monotone map, so a tie group stays in one bin), find the bin where the mass passes
    ``mass`` and order only its tokens."""
    r, vocab = dist.shape
    nb = NUCLEUS_BINS
    fin = torch.isfinite(dist)  # +inf: a -inf score, no mass
    low = dist.amin(dim=-1, keepdim=True)
    span = (dist.masked_fill(~fin, 0.0).amax(dim=-1, keepdim=True) - low).clamp_(min=1e-6, max=NUCLEUS_SPAN)
    bins = (dist - low).mul_((nb - 1) / span).clamp_(max=nb - 1).long()
    per_bin = torch.zeros(r, nb, dtype=torch.float64, device=dist.device).scatter_add_(1, bins, prob)
    cum = per_bin.cumsum(dim=-1)
    crossing = (cum < mass).sum(dim=-1, keepdim=True).clamp_(max=nb - 1)
    base = torch.where(crossing > 0, cum.gather(1, (crossing - 1).clamp(min=0)), torch.zeros_like(cum[:, :1]))
    inside = (bins == crossing) & fin
    count = inside.sum(dim=-1)
    crowded = count > NUCLEUS_MAX_BIN  # those rows are left to the sort
    count = count.masked_fill(crowded, 0)
    width = int(count.max())
    if width == 0:
        return torch.zeros(r, dtype=torch.bool, device=dist.device), low
    neg, idx = topk(dist.neg().masked_fill_(~(inside & ~crowded.view(-1, 1)), -float("inf")), width)
    ok, thr = _typical_cut(neg.neg(), prob.gather(1, idx), base, mass, count, margin)
    return ok & (count > 0), thr


def _mask_far(out: torch.Tensor, scores: torch.Tensor, dist: torch.Tensor, todo: torch.Tensor, ok: torch.Tensor,
              thr: torch.Tensor) -> torch.Tensor:
    """Write the decided typical rows (every token farther than the row's threshold removed); the rows open."""
    done = todo[ok]
    if len(done):
        out[done] = scores.index_select(0, done).masked_fill_(dist.index_select(0, done) > thr[ok], -float("inf"))
    return todo[~ok]


def top_p_rows(scores: torch.Tensor, top_ps: list[float], kernel: bool) -> torch.Tensor:
    """TopPLogitsWarper with a per-row ``top_p``, without a host sync: rows whose nucleus is clear among
    their best candidates take :func:`nucleus_cut`'s threshold (the host sampler's decision); the others
    take the Triton bisection with ``kernel`` (its failure raises), else HF's sort. Narrow rows (top-k
    candidates) are simply sorted."""
    dev = scores.device
    vocab = scores.shape[1]
    k = NUCLEUS_CANDIDATES
    if vocab <= 4 * (k + 1) or not k:
        return sorted_top_p(scores, _cut_column(top_ps, dev))
    top_p = to_device(torch.tensor(top_ps, dtype=torch.float64).view(-1, 1), dev)
    best, _, z, lse = _normaliser(scores)
    finite = torch.isfinite(lse)
    vals = torch.topk(scores, k + 1, dim=-1).values
    ok, thr = nucleus_cut(vals, lse, torch.zeros_like(lse), top_p, vals.shape[1], False, nucleus_margin(top_p, vocab))
    ok = ok.view(-1, 1) & finite
    if kernel and scores.dtype == torch.float32 and scores.stride(1) == 1:
        from ..kernels.sampling import nucleus_threshold

        # A row of -inf or NaN keeps every token (no threshold), as HF's NaN cumsum does.
        thr, first = nucleus_threshold(scores, best.nan_to_num(0.0), z.nan_to_num(1.0), top_p, ok | ~finite,
                                       torch.where(finite, thr, _NEG_INF))
        cols = torch.arange(vocab, device=dev).view(1, -1)
        return scores.masked_fill((scores < thr) | ((scores == thr) & (cols < first)), _NEG_INF)
    return torch.where(ok, scores.masked_fill(scores < thr, _NEG_INF), sorted_top_p(scores, _cut_column(top_ps, dev)))


def _normaliser(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the best score, ``exp(score - best)`` (float32, as HF's softmax), their float64 sum ``z``
    and the logsumexp (NaN for a row of -inf, +inf or NaN)."""
    best = scores.amax(dim=-1, keepdim=True)
    rel = torch.exp(scores - best)
    z = rel.sum(dim=-1, keepdim=True, dtype=torch.float64)
    return best, rel, z, best.double() + z.log()


def _cut_column(top_ps: list[float], device: torch.device) -> torch.Tensor:
    """``1 - top_p`` per row, float32 (as HF compares), for :func:`sorted_top_p`."""
    return to_device(torch.tensor([1 - p for p in top_ps], dtype=torch.float32).view(-1, 1), device)


def sorted_top_p(scores: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """TopPLogitsWarper with a per-row ``1 - top_p``, as HF computes it (a sort of every row)."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= cut
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), _NEG_INF)


def min_p_rows(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """MinPLogitsWarper with a per-row ``min_p``."""
    probs = torch.softmax(scores, dim=-1)
    top, best = probs.max(dim=-1, keepdim=True)
    remove = (probs < min_p * top).scatter_(-1, best, False)
    return scores.masked_fill(remove, _NEG_INF)


def typical_rows(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """TypicalLogitsWarper with a per-row mass (a column; or one float)."""
    return _typical_sorted(scores, _typical_distances(scores), mass)


def _typical_distances(scores: torch.Tensor) -> torch.Tensor:
    """HF's typical order key, with HF's ops (so its values bit for bit): each token's ``|-log p - H|``."""
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    ent = -(normalized * torch.exp(normalized)).nansum(-1, keepdim=True)
    return torch.abs((-normalized) - ent)


def _typical_sorted(scores: torch.Tensor, shifted: torch.Tensor, mass: torch.Tensor | float) -> torch.Tensor:
    """The rest of HF's TypicalLogitsWarper, from its distances ``shifted``: a sort of every row."""
    sorted_scores, sorted_idx = torch.sort(shifted, descending=False)
    cum = scores.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass).sum(dim=1).clamp_(max=sorted_scores.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last.view(-1, 1))
    remove[..., :1] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), _NEG_INF)
