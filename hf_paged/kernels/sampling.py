"""Triton kernels of the device sampler's rare full-row cases, one program per row, each returning at once
unless its row needs it: the draw of top-k rows whose k-th score ties (``tied_draw``), and the top-p
threshold of rows whose nucleus is not clear among their best candidates (``nucleus_threshold``).

The tied draw
-------------

HF's TopK keeps every token whose score ties the k-th best. The samplers draw such a row over the whole
vocabulary in vocabulary order, not over its k best candidates (see ``engine/device_sampler.py``). In
torch that draw costs ~10 passes over the ``[rows, vocab]`` float32 scores (scale, mask, softmax,
cumsum), on every row, though only the tied rows use it. It is also the usual case: generate()'s default
``top_k=50``, with nothing else set.

Here one program per row returns at once unless its row ties. A tied row is read twice, applying the
temperature as it is read:
1. the sum of ``exp(x - max)`` over the kept tokens (``x >= kth``), block by block;
2. the first token whose running sum passes ``u * sum``.

Only tokens with mass can be picked, capped at the last one. The result equals ``device_sampler._draw``
on the masked, scaled row, up to float rounding of the sums: a uniform that lands within that rounding of
a boundary may pick the neighbouring kept token.

The top-p threshold
-------------------
The device sampler finds most rows' nucleus among their best candidates (``engine/warpers.py``'s
``nucleus_cut``, the same decision as the host sampler's). A flat row, or one whose boundary is within
rounding of top_p, would need HF's sort of the whole row; here its threshold is found by bisection
instead: the smallest score ``v`` of the row whose tail ``mass(x <= v)`` exceeds ``1 - top_p`` (HF removes a
token when its ascending cumulative mass is ``<= 1 - top_p``; the nucleus is every token scoring ``>= v``).
It bisects over the scores' ordered bit patterns, 32 passes over the row, summing the tail (small
numbers, so accurate near top_p = 1 too) in float32 per block and the block totals in float64. Tokens
tied at ``v`` (bf16 logits have many) are kept in the number HF keeps: HF's cumsum passes them one by
one, so the lowest-indexed ones go, as a stable sort orders them (HF's CPU sort is not stable: there it
may keep other tied tokens, as many). Where the boundary is within rounding of ``1 - top_p``, a token
more or fewer.

Example::

    ids = tied_draw(scores, temps, kth, top, tied, u)   # rows with tied False get -1
    thr, first = nucleus_threshold(scores, best, z, top_p, done, thr)   # rows with done True keep their thr
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_device

BLOCK = 4096  # keys per step of a tied row: two passes of ~32 steps over a 128K vocabulary


@triton.jit
def _tied_draw_kernel(scores_ptr, stride, temp_ptr, kth_ptr, top_ptr, tied_ptr, u_ptr, out_ptr, vocab,
                      BLOCK: tl.constexpr, RECIP: tl.constexpr):
    row = tl.program_id(0)
    if tl.load(tied_ptr + row) == 0:
        return
    base = scores_ptr + row.to(tl.int64) * stride
    temp = tl.load(temp_ptr + row)  # RECIP: its reciprocal, computed by torch (see device_sampler.scaled)
    kth = tl.load(kth_ptr + row)  # the k-th best scaled score
    top = tl.load(top_ptr + row)  # the best scaled score
    cols = tl.arange(0, BLOCK)
    total = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    last = -1  # the last token with mass
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        # div_rn: IEEE division, as torch's scores / temperature (Triton's "/" is an approximation)
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        if RECIP:
            x = x * temp
        else:
            x = tl.math.div_rn(x, temp)
        p = tl.where(x >= kth, tl.exp(x - top), 0.0)
        c = tl.cumsum(p, 0)
        total += tl.sum(tl.where(cols == BLOCK - 1, c, 0.0), 0)
        last = tl.maximum(last, tl.max(tl.where(p > 0, idx, -1), 0))
    target = tl.load(u_ptr + row) * total
    run = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    best = vocab - 1
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        if RECIP:
            x = x * temp
        else:
            x = tl.math.div_rn(x, temp)
        p = tl.where(x >= kth, tl.exp(x - top), 0.0)
        c = tl.cumsum(p, 0)
        # The first token with mass whose running sum passes the target. Only tokens with mass count: a
        # parallel scan rounds each position on its own, so a removed token after the last kept one could
        # show a larger sum.
        hit = tl.min(tl.where((p > 0) & (c + run > target), idx, vocab - 1), 0)
        best = tl.minimum(best, hit)
        run += tl.sum(tl.where(cols == BLOCK - 1, c, 0.0), 0)
    # Capped at the last token with mass, as torch's draw caps at the first index whose sum is complete
    # (a uniform that rounds to the total finds no token past it).
    tl.store(out_ptr + row, tl.maximum(tl.minimum(best, last), 0).to(tl.int64))


def tied_draw(scores: torch.Tensor, temps: torch.Tensor, kth: torch.Tensor, top: torch.Tensor,
              tied: torch.Tensor, u: torch.Tensor, recip: bool | None = None) -> torch.Tensor:
    """Token of each tied row, drawn over ``softmax(scores / temps)`` restricted to scaled scores ``>= kth``
    in vocabulary order with uniform ``u``; -1 for the other rows (not read).

    ``scores`` ``[rows, vocab]`` (rows contiguous, any float dtype), and per row: ``temps`` the temperature,
    ``kth`` the k-th best and ``top`` the best scaled score, ``tied`` bool, ``u`` the uniform. ``recip``: scale
    by the temperature's reciprocal (default: on CUDA, as :func:`~hf_paged.engine.device_sampler.scaled`).
    """
    rows, vocab = scores.shape
    if scores.stride(1) != 1:
        raise ValueError("tied_draw: the score rows must be contiguous")
    out = torch.full((rows,), -1, dtype=torch.long, device=scores.device)
    if rows == 0:
        return out
    f32 = dict(dtype=torch.float32, device=scores.device)
    recip = scores.is_cuda if recip is None else recip
    temps = temps.reshape(-1).to(**f32)
    args = ((1.0 / temps if recip else temps).contiguous(), kth.reshape(-1).to(**f32).contiguous(),
            top.reshape(-1).to(**f32).contiguous(), tied.reshape(-1).to(torch.int8).contiguous(),
            u.reshape(-1).to(**f32).contiguous())
    with on_device(scores):
        _tied_draw_kernel[(rows,)](scores, scores.stride(0), *args, out, vocab, BLOCK=BLOCK, RECIP=recip,
                                   num_warps=8)
    return out


@triton.jit
def _nucleus_threshold_kernel(scores_ptr, stride, z_ptr, cut_ptr, done_ptr, best_ptr, thr_ptr, first_ptr, vocab,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if tl.load(done_ptr + row) != 0:
        return
    base = scores_ptr + row.to(tl.int64) * stride
    # Masses are exp(x - best) (float32, as HF's softmax) over the row's float64 normaliser z: an fp32
    # logsumexp would put every probability off by up to half its ulp (~2e-6 relative at 50).
    z = tl.load(z_ptr + row)
    best = tl.load(best_ptr + row)
    cut_z = tl.load(cut_ptr + row).to(tl.float64) * z  # (1 - top_p) * z
    cols = tl.arange(0, BLOCK)
    # Scores as ordered integers (negative floats flipped). The mass at or below lo is <= cut (so lo's
    # tokens go), at or below hi it is > cut (hi's stay): the tail is summed, as HF's ascending cumsum is.
    lo = tl.full([], -2139095041, tl.int64)  # -inf
    top_bits = best.to(tl.int32, bitcast=True)
    hi = tl.where(top_bits < 0, top_bits ^ 0x7FFFFFFF, top_bits).to(tl.int64)  # the best score: mass 1
    for _ in range(32):
        mid = lo + (hi - lo) // 2  # hi > lo: the same rounding whatever the signs
        key = mid.to(tl.int32)
        v = tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)
        tail = tl.zeros([], tl.float64)
        for start in range(0, vocab, BLOCK):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            tail += tl.sum(tl.where(x <= v, tl.exp(x - best), 0.0), 0).to(tl.float64)
        open_ = hi - lo > 1
        stays = tail > cut_z
        hi = tl.where(open_ & stays, mid, hi)
        lo = tl.where(open_ & ~stays, mid, lo)
    key = hi.to(tl.int32)
    t = tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)
    tl.store(thr_ptr + row, t)
    # Tokens tied at t: HF's ascending cumsum passes them one by one, removing those it reaches while at
    # most cut. Keep that many out: the lowest-indexed ones (a stable sort's order).
    below = tl.zeros([], tl.float64)
    ties = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        below += tl.sum(tl.where(x < t, tl.exp(x - best), 0.0), 0).to(tl.float64)
        ties += tl.sum((x == t).to(tl.int32), 0)
    p_t = tl.exp(t - best).to(tl.float64)  # each tied token's mass, times z
    drop = tl.minimum(tl.maximum(tl.floor((cut_z - below) / p_t), 0.0), (ties - 1).to(tl.float64)).to(tl.int32)
    first = tl.zeros([], tl.int32)  # the first index kept among the ties
    if drop > 0:
        seen = tl.zeros([], tl.int32)
        first = vocab
        for start in range(0, vocab, BLOCK):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            eq = (x == t).to(tl.int32)
            rank = tl.cumsum(eq, 0) + seen  # 1-based rank of each tied token
            first = tl.minimum(first, tl.min(tl.where((eq > 0) & (rank == drop + 1), idx, vocab), 0))
            seen += tl.sum(eq, 0)
    tl.store(first_ptr + row, first)


def nucleus_threshold(scores: torch.Tensor, best: torch.Tensor, z: torch.Tensor, top_p: torch.Tensor,
                      done: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, where HF's TopP cuts: ``(thr, first)``, ``[rows, 1]`` each. ``thr`` is the smallest score ``v``
    with ``sum(softmax(row)[row <= v]) > 1 - top_p``; the row keeps the tokens scoring above ``v``, and those
    scoring ``v`` from index ``first`` on (HF removes ties in its sort order: here the lowest indices).
    Rows with ``done`` keep their ``thr``, with ``first`` 0. ``scores`` ``[rows, vocab]`` float32 with
    contiguous rows; per row ``best`` its top score, ``z`` the sum of ``exp(row - best)`` (float64; both
    finite where not done), ``top_p``, ``done`` (bool) and ``thr``."""
    rows, vocab = scores.shape
    if scores.stride(1) != 1 or scores.dtype != torch.float32:
        raise ValueError("nucleus_threshold: float32 scores with contiguous rows")
    out = thr.reshape(-1).to(torch.float32).clone()
    first = torch.zeros(rows, dtype=torch.int32, device=scores.device)
    if rows == 0:
        return out.view(-1, 1), first.view(-1, 1)
    f32 = dict(dtype=torch.float32, device=scores.device)
    cut = (1.0 - top_p.reshape(-1).double()).to(**f32).contiguous()  # as HF compares: in float32
    args = (z.reshape(-1).to(dtype=torch.float64).contiguous(), cut, done.reshape(-1).to(torch.int8).contiguous(),
            best.reshape(-1).to(**f32).contiguous())
    with on_device(scores):
        _nucleus_threshold_kernel[(rows,)](scores, scores.stride(0), *args, out, first, vocab, BLOCK=BLOCK,
                                           num_warps=8)
    return out.view(-1, 1), first.view(-1, 1)
