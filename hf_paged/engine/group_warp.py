"""The host sampler's warpers for a group of rows with the same settings: HF's Temperature, TopK, TopP, MinP
and Typical, in generate()'s order, with the same results, but after TopK on the surviving candidates only.

Example::

    for rows, scores, index in warp_group(logits, 0.7, 50, 0.9, None, 1.0):
        ...   # index None: full-width scores; else scores[:, j] is token index[:, j]'s (the rest removed)
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper, TypicalLogitsWarper)

from . import warpers

_NO_IDS = torch.empty(1, 0, dtype=torch.long)  # the warpers never read input_ids


def warp_group(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float | None,
               typical_p: float) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """HF's sampling warpers on ``[G, V]`` rows that share settings.

    Yields ``(row positions, scores, index)``: ``index`` None for full-width scores, else the token ids of
    the TopK survivors that ``scores`` cover (-inf entries are removed tokens; every other token is too).
    """
    temper = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    later = ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []) \
        + ([MinPLogitsWarper(min_p)] if min_p else []) \
        + ([TypicalLogitsWarper(typical_p)] if typical_p < 1.0 else [])  # min_p None or 0 removes nothing
    everyone = list(range(scores.shape[0]))
    if top_k == 0 or top_k >= scores.shape[1]:  # TopK would keep every token
        for w in temper:
            scores = w(_NO_IDS, scores)
        if top_p < 1.0:  # what TopPLogitsWarper(top_p) returns, without sorting the whole vocabulary
            scores, later = warpers.nucleus(scores, top_p), later[1:]
        if typical_p < 1.0:  # likewise TypicalLogitsWarper, the last warper
            later = later[:-1]
        for w in later:
            scores = w(_NO_IDS, scores)
        if typical_p < 1.0:
            scores = warpers.typical(scores, typical_p)
        yield everyone, scores, None
        return
    # Temperature is monotonic, so the TopK survivors are the k largest raw scores: select them first and
    # scale only those (bitwise the same values as scaling the whole row). One extra candidate tells whether
    # the k-th scaled score ties with the next one: HF's TopK keeps every score >= the k-th, so such rows
    # keep more than k tokens (bf16 logits: most rows); their candidates are taken again among the
    # 4k + 64 best, where the ties end there. Rows whose ties go on, and rows whose TopP cut falls among
    # equal scores (which of them go depends on HF's sort of the whole row), take the full-width path.
    vals, index = warpers.topk(scores, top_k + 1)
    for w in temper:
        vals = w(_NO_IDS, vals)
    tied = (vals[:, top_k] == vals[:, top_k - 1]).tolist()
    exact = [j for j in everyone if not tied[j]]
    rest = [j for j in everyone if tied[j]]
    keep = exact if rest else slice(None)  # every row: no copy
    groups = [(exact, vals[keep, :top_k], index[keep, :top_k])]
    width = min(4 * top_k + 64, scores.shape[1])
    if rest and width > top_k + 1:
        wide, wide_index = warpers.topk(scores[rest], width)
        for w in temper:
            wide = w(_NO_IDS, wide)
        kth = wide[:, top_k - 1 : top_k]
        ends = ((wide[:, -1] < kth[:, 0]) | (width == scores.shape[1])).tolist()
        sel = [j for j, e in enumerate(ends) if e]
        groups.append(([rest[j] for j in sel], wide.masked_fill(wide < kth, -float("inf"))[sel], wide_index[sel]))
        rest = [m for m, e in zip(rest, ends) if not e]
    for members, v, i in groups:
        if top_p < 1.0 and members:
            straddle = warpers.top_p_straddles(v, 1 - top_p).tolist()
            rest += [m for m, x in zip(members, straddle) if x]
            keep = [j for j, x in enumerate(straddle) if not x]
            members, v, i = [members[j] for j in keep], v[keep], i[keep]
        if not members:
            continue
        # The candidates in token order: topk orders equal scores differently for another k, and the draw
        # walks them in order, so a seeded row would otherwise depend on its batch (the device sampler
        # takes its candidates for every row's k at once, and orders them the same way).
        i, order = i.sort(dim=-1)
        v = v.gather(1, order)
        for w in later:  # each is a per-row function of the surviving scores; -inf entries add nothing
            v = w(_NO_IDS, v)
        yield members, v, i
    if rest:
        rest.sort()
        full = scores[rest]
        for w in temper + [TopKLogitsWarper(top_k)] + later:
            full = w(_NO_IDS, full)
        yield rest, full, None
