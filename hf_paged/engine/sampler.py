"""Sampler: next tokens for a batch of sequences, each with its own SamplingParams.

The scores go through transformers' own logits processors, in the order
``GenerationMixin._get_logits_processor`` builds them, so greedy output equals ``generate()`` and
sampled output follows the distribution ``generate()`` samples from:

    RepetitionPenalty -> (frequency/presence penalty, OpenAI's, not in HF) -> NoRepeatNGram
    -> MinNewTokensLength (EOS banned until min_new_tokens)            [history processors, per row]
    -> Temperature -> TopK -> TopP -> MinP -> Typical                  [warpers, sampling rows only]

Cost: rows with nothing to process (greedy, default penalties, min_new_tokens reached) share one
vectorised argmax; only rows that need their history are processed one by one; sampling rows with
equal warper settings are warped together. After TopK the later warpers and the draw run on the
``k`` surviving candidates instead of the whole vocabulary (HF's TopP/Typical sort the full row);
without TopK, TopP and Typical are decided without that sort where HF's rounding allows
(``warpers.nucleus``/``warpers.typical``, the same tensors). On CPU those full-vocabulary passes are C++
kernels with the same results (``kernels/csrc/topk_cpu.cpp``, ``sample_cpu.cpp``).

Example::

    sampler = Sampler(model.config.vocab_size)
    out = sampler.sample(logits, [SamplingRow(params, token_ids, num_generated=3, generator=g)])
    out.tokens          # [next_token]
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from . import warpers
from .group_warp import warp_group
from .history import apply_history, needs_history
from .params import SamplingParams
from .penalty_state import PenaltyState, tracked

# What a log-probability of -inf (a token the processors removed) or NaN is reported as: OpenAI's
# own value for "negligible", and a number every JSON encoder accepts.
LOGPROB_FLOOR = -9999.0



@dataclass(slots=True)
class SamplingRow:
    """One sequence to sample for: its params and what HF's ``input_ids`` row would hold (no padding)."""

    params: SamplingParams
    token_ids: list[int]  # prompt + generated so far
    num_generated: int
    generator: torch.Generator | None = None  # per sequence, so a seed gives the same tokens in any batch
    # The sequence this row samples for (the engine's Sequence; anything hashable with ``.finished``, and
    # ``.num_ahead`` if tokens may be in flight): its penalties then come from the sampler's PenaltyState,
    # which records each picked token, instead of from token_ids, which may then lack a token still in
    # flight (async scheduling). The host sampler does so for float32 logits.
    owner: Any = None


@dataclass(slots=True)
class SampleOutput:
    """Chosen tokens, one per row.

    ``logprobs[i]`` is the log-probability of ``tokens[i]`` under the *processed* distribution, i.e.
    ``log_softmax`` of what ``generate(output_scores=True)`` reports for that step (after penalties,
    temperature and truncation); None for rows that did not ask. ``top_logprobs[i]`` holds up to
    ``params.top_logprobs`` ``(token, logprob)`` pairs of that same distribution, best first, leaving
    out tokens the processors removed. Both lists are None when no row in the batch asked. Values are
    never NaN nor infinite: anything below ``LOGPROB_FLOOR`` (-9999) is reported as the floor.
    """

    tokens: list[int]
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(slots=True)
class Ready:
    """A sampling result that is already on the host."""

    output: SampleOutput
    device_ids: Any = None  # the ids as a device tensor, where sampling ran on one (None: take the list)

    def result(self) -> SampleOutput:
        return self.output


@dataclass(slots=True)
class _Part:
    """Final scores for some rows: full width (``index`` None) or ``k`` candidates with their token ids."""

    rows: list[int]
    scores: torch.Tensor
    index: torch.Tensor | None
    greedy: bool
    cut: bool = False  # full-width scores that a warper cut down (most of them -inf)


class Sampler:
    """Applies each row's processors and picks its token (see the module docstring).

    ``vocab_size`` columns are considered; wider logits (a padded lm_head) are cut to it, since the
    extra ids have no token. Pass ``model.config.vocab_size`` to reproduce ``generate()`` exactly.

    Example::

        out = Sampler(256).sample(torch.randn(2, 256), [SamplingRow(p, [1, 5], 0), SamplingRow(q, [1], 0)])
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        # Rows gathered for processing land here, reused across steps: a fresh [256, 49152] float32
        # tensor costs far more in page faults than the copy itself. So one Sampler serves one thread.
        self._work: torch.Tensor | None = None
        self.penalties = PenaltyState(vocab_size, on_host=True)  # of rows with an owner (see SamplingRow.owner)

    # ------------------------------------------------------------------ public API
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleOutput:
        """Next token of every row (``logits[i]`` belongs to ``rows[i]``)."""
        logits = self._trim(logits, rows)
        n = len(rows)
        wants = [r.params.logprobs or r.params.top_logprobs > 0 for r in rows]
        out = SampleOutput([0] * n)
        if any(wants):
            out.logprobs, out.top_logprobs = [None] * n, [[] for _ in range(n)]
        fast = [i for i, r in enumerate(rows) if r.params.is_greedy and not needs_history(r)]
        if fast:
            asking = [k for k, i in enumerate(fast) if wants[i]]
            picked = None
            if len(fast) == n or 8 * len(fast) >= n:  # one pass over the whole batch beats gathering the rows
                # A greedy row that asks for its token's logprob (every TGI stream) gets it from the same
                # call, without a [rows, vocab] log_softmax.
                picked = _argmax_logprob(logits) if asking else None
                every = picked[0] if picked is not None else _argmax(logits)
                pos = every if len(fast) == n else [every[i] for i in fast]
            else:
                pos = [_argmax(logits[i : i + 1])[0] for i in fast]
            for i, t in zip(fast, pos):
                out.tokens[i] = t
            if picked is not None:
                for k in asking:
                    lp = picked[1][fast[k]]
                    out.logprobs[fast[k]] = lp if lp >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN fails >= too
                asking = [k for k in asking if rows[fast[k]].params.top_logprobs > 0]  # still want top lists
            if asking:
                idx = [fast[k] for k in asking]
                scores = logits if len(idx) == n else logits.index_select(0, torch.tensor(idx, device=logits.device))
                self._fill_logprobs(out, _Part(idx, scores, None, True), [pos[k] for k in asking], rows, wants)
        # PenaltyState's host layout takes float32 scores (the engine's); other rows read their lists.
        track = [i for i, r in enumerate(rows) if tracked(r)] if logits.dtype == torch.float32 else []
        slots = self.penalties.slots([rows[i] for i in track], logits.device) if track else []
        if len(fast) < n:
            fast_set = set(fast)
            slow = [i for i in range(n) if i not in fast_set]
            for part in self._parts(logits, rows, slow, dict(zip(track, slots))):
                if part.greedy:
                    pos = _argmax(part.scores)
                else:
                    pos = _draw(part.scores, [rows[i].generator for i in part.rows], part.cut)
                toks = pos if part.index is None else _gather(part.index, pos)
                for i, t in zip(part.rows, toks):
                    out.tokens[i] = t
                if out.logprobs is not None:
                    self._fill_logprobs(out, part, pos, rows, wants)
        if track:
            self.penalties.record(slots, [out.tokens[i] for i in track])
        return out

    def sample_async(self, logits: torch.Tensor, rows: list[SamplingRow]) -> "Ready":
        """:meth:`sample`, in the shape of :meth:`DeviceSampler.sample_async` (here already done)."""
        return Ready(self.sample(logits, rows))

    def process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The processed scores ``[S, V]`` that tokens are drawn from (``generate()``'s ``output_scores``)."""
        logits = self._trim(logits, rows)
        out = logits.clone()
        for part in self._parts(logits, rows, list(range(len(rows)))):
            if part.index is None:
                out[part.rows] = part.scores
            else:
                full = torch.full((len(part.rows), logits.shape[1]), -float("inf"), dtype=out.dtype, device=out.device)
                out[part.rows] = full.scatter_(1, part.index, part.scores)
        return out

    # ------------------------------------------------------------------ processing
    def _trim(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        logits = logits.detach()
        return logits[:, : self.vocab_size] if logits.shape[1] > self.vocab_size else logits

    def _buffer(self, logits: torch.Tensor) -> torch.Tensor:
        n, v = logits.shape
        w = self._work
        if w is None or w.shape[0] < n or w.shape[1] != v or w.dtype != logits.dtype or w.device != logits.device:
            w = self._work = torch.empty(max(n, w.shape[0] if w is not None and w.shape[1] == v else 0), v,
                                         dtype=logits.dtype, device=logits.device)
        return w

    def _parts(self, logits: torch.Tensor, rows: list[SamplingRow], which: list[int],
               slots: dict[int, int] | None = None) -> Iterator[_Part]:
        """Final scores of rows ``which``, grouped so that rows with equal warpers are warped together.
        ``slots``: the PenaltyState slot of each tracked row (the others read their token_ids)."""
        slots = slots or {}
        needs = {i for i in which if needs_history(rows[i])}
        used = 0  # each group gets its own rows of the work buffer, so no part overwrites another

        def stack(members: list[int]) -> torch.Tensor:
            nonlocal used
            if not needs.intersection(members) and members[-1] - members[0] + 1 == len(members):
                return logits[members[0] : members[-1] + 1]  # consecutive rows: a view, no copy
            dst = self._buffer(logits)[used : used + len(members)]
            used += len(members)
            plain = [j for j, i in enumerate(members) if i not in needs or i in slots]
            _copy_rows(dst, plain, logits, [members[j] for j in plain])
            at = [j for j, i in enumerate(members) if i in slots]
            if at:  # the tracked rows' penalties, all at once (PenaltyState)
                self.penalties.penalize(dst, at, [slots[members[j]] for j in at], [rows[members[j]] for j in at])
            for j, i in enumerate(members):
                if i in slots:  # penalised already; what else reads the history, on the row in place
                    if needs_history(rows[i], penalties=False):
                        _copy_rows(dst, [j], apply_history(dst[j : j + 1], rows[i], penalties=False), [0])
                elif i in needs:  # one at a time, so each row's temporaries are freed (and reused) at once
                    _copy_rows(dst, [j], apply_history(logits[i : i + 1], rows[i]), [0])
            return dst

        greedy = [i for i in which if rows[i].params.is_greedy]
        if greedy:
            yield _Part(greedy, stack(greedy), None, True)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in which:
            p = rows[i].params
            if not p.is_greedy:
                groups[(p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p)].append(i)
        for key, members in groups.items():
            cuts = key[2] < 1.0 or bool(key[3]) or key[4] < 1.0  # top_p, min_p, typical_p: most scores -inf
            for sub, scores, index in warp_group(stack(members), *key):  # (index None and top_k > 0: TopK's tied rows)
                yield _Part([members[j] for j in sub], scores, index, False,
                            index is None and (cuts or 0 < key[1] < scores.shape[1]))

    def _fill_logprobs(self, out: SampleOutput, part: _Part, pos: list[int], rows: list[SamplingRow],
                       wants: list[bool]) -> None:
        sel = [j for j, i in enumerate(part.rows) if wants[i]]
        if not sel:
            return
        scores = part.scores if len(sel) == len(part.rows) else part.scores[sel]
        logp = torch.log_softmax(scores.float(), dim=-1)
        chosen = logp.gather(1, torch.tensor([pos[j] for j in sel], device=logp.device).view(-1, 1))
        for j, lp in zip(sel, chosen.view(-1).tolist()):
            out.logprobs[part.rows[j]] = lp if lp >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN fails >= too
        k = min(max(rows[part.rows[j]].params.top_logprobs for j in sel), logp.shape[1])
        if k > 0:
            vals, cols = warpers.topk(logp, k)
            ids = cols if part.index is None else part.index[sel].gather(1, cols)
            for j, vs, ts in zip(sel, vals.tolist(), ids.tolist()):
                n = rows[part.rows[j]].params.top_logprobs
                out.top_logprobs[part.rows[j]] = [(t, max(v, LOGPROB_FLOOR)) for t, v in zip(ts[:n], vs[:n])
                                                if v > -math.inf]


def _argmax(scores: torch.Tensor) -> list[int]:
    # On CPU: the C++ kernel (SIMD, rows split between threads), else numpy's argmax (SIMD, one thread),
    # both several times faster than torch's there. All return the first index of the maximum (and the
    # first NaN), so ties resolve like generate()'s torch.argmax.
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        if scores.dtype == torch.float32 and scores.dim() == 2 and scores.shape[1] and scores.stride(1) == 1 \
                and scores.shape[0] * scores.shape[1] >= _KERNEL_ARGMAX_MIN:
            from ..kernels import cpu

            if cpu.available():
                return cpu.argmax_rows(scores).tolist()
        return np.argmax(scores.numpy(), axis=-1).tolist()
    return scores.argmax(dim=-1).tolist()


def _argmax_logprob(scores: torch.Tensor) -> tuple[list[int], list[float]] | None:
    """:func:`_argmax` and each pick's ``log_softmax`` value (NaN where a row's maximum is not finite), in
    one C++ call on CPU; None where that kernel does not apply (the caller takes the general path)."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2 and scores.shape[1] \
            and scores.stride(1) == 1:
        from ..kernels import cpu

        if cpu.available():
            ids, lps = cpu.argmax_logprob_rows(scores)
            return ids.tolist(), lps.tolist()
    return None


_KERNEL_ARGMAX_MIN = 1 << 16  # below this many scores numpy's single pass is as fast as a threaded one


def _copy_rows(dst: torch.Tensor, dst_rows: list[int], src: torch.Tensor, src_rows: list[int]) -> None:
    """``dst[dst_rows] = src[src_rows]``; on CPU through numpy, a plain memcpy per row: torch runs such
    copies as OpenMP regions, which stall for milliseconds each when the cores are busy elsewhere."""
    if not dst_rows:
        return
    if src.device.type == "cpu" and src.dtype == dst.dtype and src.dtype in (torch.float32, torch.float64):
        out, inp = dst.numpy(), src.numpy()
        # Row by row: ~3x faster than np.take(..., out=) or fancy indexing here (8 vs 26 ms at [256, 49152]).
        for d, s in zip(dst_rows, src_rows):
            out[d] = inp[s]
        return
    dst[dst_rows] = src[src_rows]


def _draw(scores: torch.Tensor, generators: list[torch.Generator | None], cut: bool = False) -> list[int]:
    """One token per row from ``softmax(scores)``, by inverse CDF with one uniform from the row's generator.

    Same distribution as ``torch.multinomial(probs, 1)`` (ms a row on CPU), by a batched cumsum: one uniform a row.
    The result of a row depends only on its scores and its generator, never on the rest of the batch.
    ``cut``: most scores are -inf; on CPU ``cpu.cdf_draw`` then finds the same picks without writing the CDF.
    """
    probs = torch.softmax(scores, dim=-1)
    # float64 where it is cheap (TopK candidates); a full-vocabulary row keeps float32 (cumsum still
    # accumulates in double on CPU) rather than doubling the largest temporary of the step. A single row
    # on CUDA too: there one row's scan regroups its additions (see device_sampler._draw).
    wide = scores.shape[1] <= 4096 or (scores.shape[0] == 1 and scores.is_cuda)
    u = torch.rand(len(generators), dtype=torch.float64) if all(g is None for g in generators) else torch.cat(
        [torch.rand(1, dtype=torch.float64, generator=g, device=g.device) if g is not None
         else torch.rand(1, dtype=torch.float64) for g in generators])  # unseeded: torch's own, in row order
    fast = warpers._kernel_rows(probs) if cut and not wide else None
    picks = fast.cdf_draw(probs, u.cpu()).tolist() if fast else [-1]
    if min(picks) >= 0:  # else (no kernel, or a NaN row) torch's searches below, with the same uniforms
        return picks
    cdf = probs.cumsum(dim=-1, dtype=torch.float64 if wide else scores.dtype)
    total = cdf[:, -1:]
    u = u.to(device=cdf.device, dtype=cdf.dtype).view(-1, 1)
    pos = torch.searchsorted(cdf, u * total, right=True)
    # u * total can round up to total; the first index reaching total is the last token with p > 0.
    last = torch.searchsorted(cdf, total.contiguous(), right=False)
    return torch.minimum(pos, last).clamp_(max=scores.shape[1] - 1).view(-1).tolist()


def _gather(index: torch.Tensor, pos: list[int]) -> list[int]:
    return index.gather(1, torch.tensor(pos, device=index.device).view(-1, 1)).view(-1).tolist()
