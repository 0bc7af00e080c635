"""DeviceSampler: the :class:`~hf_paged.engine.sampler.Sampler`'s choices, computed on the logits'
device for every row at once, with one device-to-host copy per step.

Same processors, same order, same results (tested against the host sampler on CPU tensors: equal
tokens for greedy and for seeded sampling). What differs is how: per-row settings travel as small
tensors, so a batch of 256 rows with different temperatures, top-k/top-p/min-p/typical and
penalties costs a fixed number of kernels, and nothing but the final ids (and the log-probabilities a
row asked for) comes back to the host. Full-vocabulary logits never leave the device.

Seeded rows draw their uniform number from their own ``torch.Generator`` on the host (one float per
row, copied with the step's parameters), so a seed gives the same tokens in any batch and on any
device, as the host sampler does.

How the host sampler's two draw paths are reproduced: a row with ``0 < top_k < vocab`` draws over its
``top_k`` best candidates in score order, unless the ``top_k``-th and the next score tie (HF's TopK
then keeps every tied token), in which case it draws over the whole row in vocabulary order. Both
draws run for such rows and the tie decides, on the device.

Example::

    sampler = DeviceSampler(model.config.vocab_size)
    out = sampler.sample(logits_on_gpu, [SamplingRow(params, token_ids, num_generated=3, generator=g)])
    out.tokens          # [next_token]
"""
from __future__ import annotations

import logging
import math
import os

import torch

from ..kv.metadata import column_tensor, index_tensor, to_device
from . import warpers
from .history import apply_history_rows
from .penalty_state import PenaltyState, tracked
from .sampler import LOGPROB_FLOOR, Ready, SampleOutput, SamplingRow

_NEG_INF = -float("inf")
logger = logging.getLogger("hf_paged")


class DeviceSampler:
    """Vectorised sampling on the logits' device (see the module docstring). It modifies ``logits``
    in place: pass a tensor the caller no longer needs (the runner's logits of this step)."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self.penalties = PenaltyState(vocab_size)  # of rows with an owner (see SamplingRow.owner)

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleOutput:
        """Next token of every row (``logits[i]`` belongs to ``rows[i]``)."""
        return self.sample_async(logits, rows).result()

    @torch.inference_mode()  # the runner's logits are inference tensors, which only inference mode updates in place
    def sample_async(self, logits: torch.Tensor, rows: list[SamplingRow]) -> "Pending | Ready":
        """Queue the sampling on the device and the copy of its result into pinned host memory;
        ``.result()`` waits for that copy (the step's one device-to-host transfer)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        n = len(rows)
        if n == 0:
            return Ready(SampleOutput([]))
        scores = logits.detach()
        if scores.shape[1] > self.vocab_size:
            scores = scores[:, : self.vocab_size]
        if scores.dtype != torch.float32:
            scores = scores.float()
        dev = scores.device
        track = [i for i, r in enumerate(rows) if tracked(r)]
        slots = self.penalties.slots([rows[i] for i in track], dev) if track else []
        apply_history_rows(scores, rows, self.penalties, dict(zip(track, slots)))
        tokens = torch.empty(n, dtype=torch.long, device=dev)
        greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
        drawn = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        final = scores  # the processed scores of every row, full width (logprobs are read from them)
        if greedy:
            if len(greedy) == n:
                tokens = scores.argmax(dim=-1)
            else:
                g = index_tensor(greedy, dev)
                tokens.index_copy_(0, g, scores.index_select(0, g).argmax(dim=-1))
        if drawn:
            sub = scores if len(drawn) == n else scores.index_select(0, index_tensor(drawn, dev))
            drawn_rows = [rows[i] for i in drawn]
            if _fused_applies(sub, drawn_rows):
                picked, processed = _topk_draw_fused(sub, drawn_rows), None  # no drawn row reads its scores
            else:
                picked, processed = _sample_rows(sub, drawn_rows)
            if len(drawn) == n:
                tokens = picked
                final = scores if processed is None else processed
            else:
                d = index_tensor(drawn, dev)
                tokens.index_copy_(0, d, picked)
                if processed is not None:
                    scores.index_copy_(0, d, processed)
        if track:  # on the device, before the ids come back: the next step may sample before they do
            picked = tokens if len(track) == n else tokens.index_select(0, index_tensor(track, dev))
            self.penalties.record(slots, picked)
        flat, wants, k = _pack(tokens, final, rows)
        if dev.type != "cuda":
            return Ready(_unpack(flat.tolist(), rows, wants, k))
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(dev))  # the copy's stream: the current device may be another
        return Pending(host, done, rows, wants, k, tokens)


class Pending:
    """Sampled ids on their way to the host (``device_ids``: the same ids on the device, which the next
    step's input takes under async scheduling)."""

    __slots__ = ("_host", "_done", "_rows", "_wants", "_k", "device_ids")

    def __init__(self, host: torch.Tensor, done: "torch.cuda.Event", rows: list[SamplingRow], wants: list[int],
                 k: int, device_ids: torch.Tensor | None = None) -> None:
        self._host, self._done, self._rows, self._wants, self._k = host, done, rows, wants, k
        self.device_ids = device_ids

    def result(self) -> SampleOutput:
        self._done.synchronize()
        return _unpack(self._host.tolist(), self._rows, self._wants, self._k)


# ---------------------------------------------------------------------------------- warpers and draw
def _sample_rows(scores: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled ids of ``rows`` (all sampling) and their processed full-width scores."""
    dev = scores.device
    n, vocab = scores.shape
    temps = [r.params.temperature for r in rows]
    if any(t != 1.0 for t in temps):
        scores = scaled(scores, column_tensor(temps, dev))  # TemperatureLogitsWarper
    u = _uniforms(rows, dev)
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]
    cand = [i for i, k in enumerate(ks) if k]
    if cand:
        every = len(cand) == n  # every row a top-k row (generate()'s default top_k=50): no gather, no scatter
        c = None if every else index_tensor(cand, dev)
        full_c = scores if every else scores.index_select(0, c)
        top_vals, top_idx, kth, tied = _candidates(full_c, [ks[i] for i in cand])
        if any(rows[i].params.top_p < 1.0 for i in cand):  # a TopP cut among equal scores: the full-row draw
            cuts = [1 - rows[i].params.top_p if rows[i].params.top_p < 1.0 else -1.0 for i in cand]
            tied = tied | warpers.top_p_straddles(top_vals, column_tensor(cuts, dev))
        # TopKLogitsWarper on the full rows: every score below the k-th goes (ties stay).
        full_c.masked_fill_(full_c < kth, _NEG_INF)
        if not every:
            scores.index_copy_(0, c, full_c)
    scores = _later_warpers(scores, rows, list(range(n)))
    picked = _draw(scores, u)
    if cand:
        sub_rows = [rows[i] for i in cand]
        top_vals = _later_warpers(top_vals, sub_rows, list(range(len(cand))))
        pos = _draw_candidates(top_vals, u if c is None else u.index_select(0, c), [ks[i] for i in cand])
        from_cand = top_idx.gather(1, pos.view(-1, 1)).view(-1)
        if c is None:
            return torch.where(tied, picked, from_cand), scores
        picked.index_copy_(0, c, torch.where(tied, picked.index_select(0, c), from_cand))
    return picked, scores


def scaled(scores: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """TemperatureLogitsWarper's bits with a per-row temperature column: HF divides by a Python float, which
    CUDA computes as a product with the float32 reciprocal (its kernel's shortcut for a scalar divisor), the
    CPU as a true division. Scores off by an ulp would move ties and top-p boundaries."""
    return scores * (1.0 / temps) if scores.is_cuda else scores / temps


def _candidates(scores: torch.Tensor, ks: list[int], temps: torch.Tensor | None = None):
    """Each row's ``ks[i]`` best candidates as its draw sees them: ``(vals, ids, kth, tied)``.

    ``vals`` ``[rows, max(ks)]`` are the scores (divided by ``temps`` when given: temperature is monotonic,
    so the k best scaled scores are the k best raw ones, and a candidate scaled is what scaling its row
    gives), -inf past a row's k; ``ids`` their tokens; ``kth`` ``[rows, 1]`` the k-th best; ``tied``
    whether the next score equals it (HF's TopK then keeps that one and every other tie).

    A row's candidates are in token order, those past its k last: ``topk`` orders equal scores differently
    for another ``k``, and the draw walks the candidates in order, so a seeded row would otherwise draw
    another token when a row with a larger top_k shares its batch (the host sampler orders them the same)."""
    dev = scores.device
    kmax = max(ks)
    vals, ids = torch.topk(scores, kmax + 1, dim=-1)
    if temps is not None:
        vals = scaled(vals, temps)
    k = index_tensor(ks, dev).view(-1, 1)
    kth = vals.gather(1, k - 1)
    tied = (vals.gather(1, k) == kth).view(-1)
    past = torch.arange(kmax, device=dev).view(1, -1) >= k
    ids = ids[:, :kmax]
    _, order = ids.masked_fill(past, scores.shape[1]).sort(dim=-1)
    return (vals[:, :kmax].masked_fill(past, _NEG_INF).gather(1, order), ids.gather(1, order), kth, tied)


# The Triton kernels (kernels/sampling.py: the draw of tied top-k rows, the top-p threshold of flat rows): on
# CUDA unless HF_PAGED_FUSED_DRAW=0; =1 also on CPU tensors (in Triton's interpreter: tests). Each is turned
# off for the process, alone, if a launch of it fails.
_kernel_ok = {"tied_draw": True, "top_p": True}


def kernels_ok() -> bool:
    """Whether every sampling kernel is still on (none has failed in this process)."""
    return all(_kernel_ok.values())


def _kernels_on(scores: torch.Tensor) -> bool:
    """Whether the Triton kernels run for these scores (HF_PAGED_FUSED_DRAW, above)."""
    flag = os.environ.get("HF_PAGED_FUSED_DRAW", "").strip()
    return flag != "0" and (scores.is_cuda or flag == "1")


def _fused_applies(scores: torch.Tensor, rows: list[SamplingRow]) -> bool:
    """Every row a plain top-k row (temperature at most): no later warper, no logprobs."""
    if not _kernel_ok["tied_draw"] or not _kernels_on(scores):
        return False
    vocab = scores.shape[1]
    for r in rows:
        p = r.params
        if not 0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p or p.typical_p < 1.0 or p.logprobs or p.top_logprobs:
            return False
    return True


def _topk_draw_fused(scores: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """:func:`_sample_rows` for rows that :func:`_fused_applies` to, without its full-width passes: the
    ``k`` candidates come from the raw scores (temperature is monotonic, and scaling a candidate gives the
    value scaling its row would), each row draws over them, and only the rows whose k-th score ties are
    drawn again over their whole row, by the Triton kernel."""
    dev = scores.device
    temps = column_tensor([r.params.temperature for r in rows], dev)
    u = _uniforms(rows, dev)
    vals, ids, kth, tied = _candidates(scores, [r.params.top_k for r in rows], temps)
    from_cand = ids.gather(1, _draw_candidates(vals, u, [r.params.top_k for r in rows]).view(-1, 1)).view(-1)
    full = None
    if _kernel_ok["tied_draw"]:
        try:
            from ..kernels.sampling import tied_draw

            full = tied_draw(scores, temps, kth, vals.amax(dim=1), tied, u)
        except Exception:  # noqa: BLE001 - a kernel that fails to compile or launch: the torch draw from now on
            _kernel_ok["tied_draw"] = False
            logger.warning("hf_paged: the Triton top-k draw failed; sampling uses the torch draw", exc_info=True)
    if full is None:  # the full-width draw of _sample_rows, same uniforms
        full = scaled(scores, temps)
        full = _draw(full.masked_fill_(full < kth, _NEG_INF), u)
    return torch.where(tied, full, from_cand)


def _later_warpers(scores: torch.Tensor, rows: list[SamplingRow], which: list[int]) -> torch.Tensor:
    """TopP -> MinP -> Typical (HF's warpers, per-row settings), on the rows that use each."""
    dev = scores.device
    top_p = [i for i in which if rows[i].params.top_p < 1.0]
    if top_p:
        scores = _on_rows(scores, top_p, lambda s: _top_p(s, [rows[i].params.top_p for i in top_p]))
    min_p = [i for i in which if rows[i].params.min_p]
    if min_p:
        scores = _on_rows(scores, min_p,
                          lambda s: warpers.min_p_rows(s, column_tensor([rows[i].params.min_p for i in min_p], dev)))
    typical = [i for i in which if rows[i].params.typical_p < 1.0]
    if typical:
        masses = column_tensor([rows[i].params.typical_p for i in typical], dev)
        scores = _on_rows(scores, typical, lambda s: warpers.typical_rows(s, masses))
    return scores


def _on_rows(scores: torch.Tensor, which: list[int], fn) -> torch.Tensor:
    if len(which) == scores.shape[0]:
        return fn(scores)
    idx = index_tensor(which, scores.device)
    out = scores.clone()
    out.index_copy_(0, idx, fn(scores.index_select(0, idx)))
    return out


def _top_p(scores: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    """TopPLogitsWarper with a per-row ``top_p`` (:func:`~hf_paged.engine.warpers.top_p_rows`), the Triton
    threshold for the rows it cannot decide while the kernels are on."""
    if _kernel_ok["top_p"] and _kernels_on(scores):
        try:
            return warpers.top_p_rows(scores, top_ps, kernel=True)
        except Exception:  # noqa: BLE001 - as in _topk_draw_fused: the torch path from now on
            _kernel_ok["top_p"] = False
            logger.warning("hf_paged: the Triton top-p threshold failed; top-p sorts every row", exc_info=True)
    return warpers.top_p_rows(scores, top_ps, kernel=False)


def _draw_candidates(vals: torch.Tensor, u: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """:func:`_draw` over :func:`_candidates`' ``vals``, each row summed as the host sampler sums its ``k``
    candidates: in float64 for ``k <= _WIDE`` also beside a row with more (the batch's width would make it
    float32, and a seeded row's token depend on its batch)."""
    if vals.shape[1] <= _WIDE or min(ks) > _WIDE:
        return _draw(vals, u)
    pos = _draw(vals, u)
    narrow = index_tensor([j for j, k in enumerate(ks) if k <= _WIDE], vals.device)
    return pos.index_copy_(0, narrow, _draw(vals.index_select(0, narrow)[:, :_WIDE], u.index_select(0, narrow)))


_WIDE = 4096  # the widest rows whose draw sums in float64


def _draw(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw with the given uniforms, as the host sampler's ``_draw`` (float64 sums up to
    4096 columns, the scores' dtype above). A single row on CUDA sums in float64 too: CUDA scans one row
    in a regrouped order whose float32 sums need not stay level across a run of tokens without mass, so
    the search could land on such a token after the last kept one; in float64 that gap is ~1e-16."""
    probs = torch.softmax(scores, dim=-1)
    wide = scores.shape[1] <= _WIDE or (scores.shape[0] == 1 and scores.is_cuda)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64 if wide else scores.dtype)
    total = cdf[:, -1:]
    pos = torch.searchsorted(cdf, u.to(cdf.dtype).view(-1, 1) * total, right=True)
    last = torch.searchsorted(cdf, total.contiguous(), right=False)
    return torch.minimum(pos, last).clamp_(max=scores.shape[1] - 1).view(-1)


def _uniforms(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """One uniform per row: from the row's generator when seeded (as the host sampler draws it)."""
    free = sum(r.generator is None for r in rows)
    shared = iter(torch.rand(free, dtype=torch.float64).tolist()) if free else iter(())
    u = [torch.rand(1, dtype=torch.float64, generator=r.generator, device=r.generator.device).item()
         if r.generator is not None else next(shared) for r in rows]
    return to_device(torch.tensor(u, dtype=torch.float64), device)


# ---------------------------------------------------------------------------------- the one copy back
def _pack(tokens: torch.Tensor, scores: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, list[int], int]:
    """Ids, and the log-probabilities rows asked for, as one float64 device tensor (ids are exact)."""
    wants = [i for i, r in enumerate(rows) if r.params.logprobs or r.params.top_logprobs > 0]
    if not wants:
        return tokens, wants, 0
    w = index_tensor(wants, scores.device)
    logp = torch.log_softmax(scores.index_select(0, w), dim=-1)
    chosen = logp.gather(1, tokens.index_select(0, w).view(-1, 1)).view(-1)
    k = min(max(rows[i].params.top_logprobs for i in wants), logp.shape[1])
    parts = [tokens.double(), chosen.double()]
    if k > 0:
        vals, ids = logp.topk(k, dim=-1)
        parts += [vals.double().flatten(), ids.double().flatten()]
    return torch.cat(parts), wants, k


def _unpack(flat: list, rows: list[SamplingRow], wants: list[int], k: int) -> SampleOutput:
    n = len(rows)
    if not wants:
        return SampleOutput(flat)
    out = SampleOutput([int(t) for t in flat[:n]], [None] * n, [[] for _ in range(n)])
    m = len(wants)
    lps = flat[n : n + m]
    vals = flat[n + m : n + m + m * k]
    ids = flat[n + m + m * k :]
    for j, i in enumerate(wants):
        lp = lps[j]
        out.logprobs[i] = lp if lp >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN fails >= too
        top = rows[i].params.top_logprobs
        out.top_logprobs[i] = [(int(t), max(v, LOGPROB_FLOOR)) for t, v in zip(ids[j * k : j * k + top],
                                                                               vals[j * k : j * k + top])
                               if v > -math.inf]
    return out
