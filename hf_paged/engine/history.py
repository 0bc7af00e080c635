"""The logits processors that read a sequence's tokens, in ``generate()``'s order: HF's repetition penalty,
OpenAI's frequency and presence penalties (over generated tokens only), HF's n-gram bans and
min_new_tokens' EOS ban. ``apply_history`` is the host sampler's, one ``[1, V]`` row at a time;
``apply_history_rows`` the device sampler's, one vectorised op per processor for a whole batch. Rows that
name their sequence take the penalties from a :class:`~hf_paged.engine.penalty_state.PenaltyState`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from ..kv.metadata import column_tensor, index_tensor, padded_tensor
from .penalty_state import PenaltyState

if TYPE_CHECKING:
    from .sampler import SamplingRow

_NEG_INF = -float("inf")


def needs_history(row: "SamplingRow", penalties: bool = True) -> bool:
    """Whether a processor here changes ``row``'s scores (``penalties=False``: one besides the penalties)."""
    return processes(row.params, row.num_generated, penalties)


def processes(p: Any, num_generated: int, penalties: bool = True) -> bool:
    """:func:`needs_history` for params ``p`` with ``num_generated`` tokens so far (no row needed)."""
    return ((penalties and (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0))
            or p.no_repeat_ngram_size > 0 or (num_generated < p.min_new_tokens and bool(p.eos_token_id)))


def apply_history(scores: torch.Tensor, row: "SamplingRow", penalties: bool = True) -> torch.Tensor:
    """The processors that read the row's tokens, on ``[1, V]`` scores, in generate()'s order
    (``penalties=False``: all but the repetition, frequency and presence penalties)."""
    p = row.params
    ids = None
    if penalties or p.no_repeat_ngram_size > 0:
        ids = torch.tensor(row.token_ids, dtype=torch.long, device=scores.device).unsqueeze(0)
    if penalties and p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if penalties and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and row.num_generated > 0:
        # OpenAI semantics: counts over generated tokens only; right after HF's repetition penalty.
        vocab = scores.shape[1]
        gen = ids[0, ids.shape[1] - row.num_generated :]
        counts = torch.bincount(gen, minlength=vocab)[:vocab].to(scores.dtype)
        scores = scores - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(scores.dtype))
    if p.no_repeat_ngram_size > 0:
        scores = NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size)(ids, scores)
    if row.num_generated < p.min_new_tokens and p.eos_token_id:
        # What MinNewTokensLengthLogitsProcessor does (EOS ids to -inf), without its isin over the
        # whole vocabulary per row and step.
        eos = p.eos_token_id if isinstance(p.eos_token_id, (list, tuple)) else [p.eos_token_id]
        eos = [e for e in eos if 0 <= e < scores.shape[1]]
        if eos:
            scores = scores.clone()
            scores[:, eos] = -float("inf")
    return scores


def apply_history_rows(scores: torch.Tensor, rows: list["SamplingRow"], state: PenaltyState | None = None,
                       slots: dict[int, int] | None = None) -> None:
    """generate()'s history processors, in its order, in place, one vectorised op per processor. The
    penalties of rows in ``slots`` (row -> slot of ``state``) come from ``state``, the others' from their
    token_ids (the same values: see :mod:`.penalty_state`)."""
    dev = scores.device
    slots = slots or {}
    width = scores.shape[1]
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0 and (r.token_ids or i in slots)]
    for part in _split(rep, slots):
        idx = index_tensor(part, dev)
        pen = column_tensor([rows[i].params.repetition_penalty for i in part], dev)
        # HF divides by a Python float, which CUDA does as a product with the float32 reciprocal (as
        # PenaltyState.penalize): the same here, so greedy picks after a penalty stay generate()'s.
        inv = 1.0 / pen if dev.type == "cuda" else None
        sub = scores.index_select(0, idx)
        if part[0] in slots:  # RepetitionPenaltyLogitsProcessor over each row's set of tokens
            div = sub * inv if inv is not None else sub / pen
            sub = torch.where(state.seen([slots[i] for i in part], width), torch.where(sub < 0, sub * pen, div), sub)
        else:
            ids = padded_tensor([rows[i].token_ids for i in part], dev)
            got = sub.gather(1, ids)  # the same, per row, from its token list
            sub.scatter_(1, ids, torch.where(got < 0, got * pen, got * inv if inv is not None else got / pen))
        scores.index_copy_(0, idx, sub)
    pen_rows = [i for i, r in enumerate(rows) if (r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0)
                and r.num_generated > 0]
    for part in _split(pen_rows, slots):  # OpenAI's penalties over generated tokens only (see Sampler)
        idx = index_tensor(part, dev)
        if part[0] in slots:
            counts = state.counts([slots[i] for i in part], width).to(scores.dtype)
        else:
            gen = [rows[i].token_ids[len(rows[i].token_ids) - rows[i].num_generated:] for i in part]
            ids = padded_tensor(gen, dev)
            weight = padded_tensor([[1] * len(g) for g in gen], dev, pad=0, dtype=scores.dtype)
            counts = torch.zeros(len(part), width, dtype=scores.dtype, device=dev)
            counts.scatter_add_(1, ids, weight)
        freq = column_tensor([rows[i].params.frequency_penalty for i in part], dev)
        pres = column_tensor([rows[i].params.presence_penalty for i in part], dev)
        sub = scores.index_select(0, idx)
        scores.index_copy_(0, idx, sub - (freq * counts + pres * (counts > 0).to(scores.dtype)))
    for i, r in enumerate(rows):  # rare, and HF's processor is host code over the ids: kept per row
        if r.params.no_repeat_ngram_size > 0:
            ids = index_tensor(r.token_ids, dev).unsqueeze(0)  # HF scatters it into the scores (pinned: no wait)
            scores[i : i + 1] = NoRepeatNGramLogitsProcessor(r.params.no_repeat_ngram_size)(ids, scores[i : i + 1])
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for i, r in enumerate(rows):  # MinNewTokensLength: EOS banned until min_new_tokens
        p = r.params
        if r.num_generated < p.min_new_tokens and p.eos_token_id:
            eos = p.eos_token_id if isinstance(p.eos_token_id, (list, tuple)) else [p.eos_token_id]
            for e in eos:
                if 0 <= e < scores.shape[1]:
                    ban_rows.append(i)
                    ban_cols.append(e)
    if ban_rows:
        at = (index_tensor(ban_rows, dev), index_tensor(ban_cols, dev))
        scores.index_put_(at, torch.full((), _NEG_INF, device=dev))


def _split(which: list[int], slots: dict[int, int]) -> list[list[int]]:
    """``which`` as the rows with a slot and the rows without, leaving out an empty part."""
    with_slot = [i for i in which if i in slots]
    without = [i for i in which if i not in slots]
    return [p for p in (with_slot, without) if p]
