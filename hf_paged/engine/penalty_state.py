"""PenaltyState: what the repetition, frequency and presence penalties read of each sequence's tokens, kept
by the sampler and brought up to date by it with every token it picks.

HF's ``RepetitionPenaltyLogitsProcessor`` reads the set of tokens in ``input_ids`` (prompt and output);
OpenAI's frequency and presence penalties read how often each output token occurs. Building those from
each row's token list every step costs host time that grows with the context: ``torch.tensor`` of 256
histories of 2000 tokens takes ~110 ms here, and the device sampler built two such tensors a step, where
the GPU's whole step should take a few ms. It also needs every token on the host, so one request with a
penalty stopped async scheduling for the whole batch.

Each tracked sequence owns a slot, filled from its token list once, on its first sample (when no token
of it can be in flight); after that the sampler records each token it picks. Two layouts:

* on the device (:class:`~hf_paged.engine.device_sampler.DeviceSampler`): ``seen`` ``[slots, vocab]`` bool
  (prompt and output tokens) and ``counts`` ``[slots, vocab]`` float32 (output tokens). A pick is recorded
  by a scatter on the device, so the next step can sample before the host has seen it; the penalties are
  full-row selections (``torch.where``), without a sync.
* on the host (:class:`~hf_paged.engine.sampler.Sampler`, ``on_host=True``): each slot's tokens as a growing
  numpy array (converted once, then appended to), plus ``counts``. The penalties touch only the history's
  scores: one gather and one scatter for all the step's rows (HF's processor also gathers by the token
  list, duplicates included, which write the same value).

Either way the processed scores are bit for bit what the token-list processors give (the same
elementwise float32 operations on the same scores; tests compare exact logprobs), but for the sign of a
zero score: the list path subtracts a zero penalty from every score of the row, which can turn -0.0 into
+0.0. The host layout takes float32 scores (the engine's are). A slot is given back once its
sequence is finished (checked when a slot is wanted), so a cancelled or stopped request needs no call. A
sequence whose recorded length falls behind its token list (tokens appended without this sampler) is
filled again from the list.

Example::

    state = PenaltyState(vocab_size)
    slots = state.slots(rows, scores.device)      # rows with .owner set and a penalty
    seen, counts = state.seen(slots), state.counts(slots)
    ... pick tokens ...
    state.record(slots, picked_ids_on_device)
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..kv.metadata import host_tensor, to_device

if TYPE_CHECKING:
    from .sampler import SamplingRow

logger = logging.getLogger("hf_paged")


def _in_flight(row: "SamplingRow") -> int | None:
    """Tokens of ``row``'s sequence sampled but not in its list yet (the engine's Sequence.num_ahead), or
    None where the owner does not say."""
    return getattr(row.owner, "num_ahead", None)


def tracked(row: "SamplingRow") -> bool:
    """Whether ``row``'s penalties can come from a :class:`PenaltyState` (an owner, and a penalty to read)."""
    p = row.params
    return row.owner is not None and (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0
                                      or p.presence_penalty != 0.0)


class PenaltyState:
    def __init__(self, vocab_size: int, *, on_host: bool = False) -> None:
        self.vocab = vocab_size
        self.on_host = on_host
        self._seen: torch.Tensor | None = None  # device: [cap, vocab] bool, prompt and output tokens of each slot
        self._counts: torch.Tensor | None = None  # [cap, vocab] float32: occurrences of each output token
        self._hist: list[np.ndarray | None] = []  # host: slot -> its tokens (the first _length[slot] entries)
        self._prompt: list[int] = []  # host: slot -> tokens before the output
        self._slot: dict[Any, int] = {}  # owner -> slot
        self._owner: list[Any] = []  # slot -> owner (None: free)
        self._length: list[int] = []  # slot -> tokens recorded (prompt included)
        self._free: list[int] = []
        self._calls = 0

    # ------------------------------------------------------------------ slots
    def slots(self, rows: list["SamplingRow"], device: torch.device) -> list[int]:
        """The slot of each row's owner, filled from its token list where it has none yet (or where its list
        grew without :meth:`record`). A row's token list holds every token but those in flight."""
        device = torch.device("cpu") if self.on_host else torch.device(device)
        if self._counts is not None and self._counts.device != device:
            self.__init__(self.vocab, on_host=self.on_host)  # a new device: start over (owners are filled again)
        taken = {r.owner for r in rows}  # never swept by this call, finished or not
        self._calls += 1
        if self._calls % 64 == 0:
            self._sweep(taken)  # now and then, so finished sequences are not held for long
        out: list[int] = []
        fill: list[tuple[int, "SamplingRow"]] = []
        for r in rows:
            slot = self._slot.get(r.owner)
            if slot is None:
                slot = self._take(r.owner, device, taken)
                fill.append((slot, r))
            else:
                n, ahead = self._length[slot], _in_flight(r)
                if (n != len(r.token_ids) + ahead) if ahead is not None else not 0 <= n - len(r.token_ids) <= 1:
                    fill.append((slot, r))  # tokens appended without record(), or recorded and then lost
            out.append(slot)
        if fill:
            self._fill(fill)
        return out

    def seen(self, slots: list[int], width: int | None = None) -> torch.Tensor:
        """Device layout: ``[len(slots), width]`` bool (``width`` at most vocab, default vocab), which tokens
        each slot's sequence holds."""
        return self._seen[:, :width].index_select(0, self._index(slots))

    def counts(self, slots: list[int], width: int | None = None) -> torch.Tensor:
        """``[len(slots), width]`` float32: how often each token occurs in each slot's output."""
        return self._counts[:, :width].index_select(0, self._index(slots))

    def penalize(self, scores: torch.Tensor, at: list[int], slots: list[int], rows: list["SamplingRow"]) -> None:
        """Host layout: apply ``rows[i]``'s repetition, then frequency and presence penalties to row ``at[i]``
        of the contiguous ``scores`` ``[R, V]`` (on CPU, or wherever the host sampler runs), in place, from
        slot ``slots[i]``."""
        width, dev = scores.shape[1], scores.device
        if scores.dtype != torch.float32:
            raise TypeError(f"penalize takes float32 scores, got {scores.dtype}")
        flat = scores.view(-1)
        rep = [k for k, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep:  # RepetitionPenaltyLogitsProcessor: each history token's score, once whatever its count
            idx, owner = self._gather([slots[k] for k in rep], [at[k] for k in rep], width, output_only=False)
            pen = _per_token([rows[k].params.repetition_penalty for k in rep], owner)
            idx, pen = idx.to(dev), pen.to(dev)
            got = flat[idx]
            # HF divides by a Python float: true division on CPU, a product with the float32 reciprocal on
            # CUDA (its kernel's shortcut for a scalar divisor). The same here, so the bits are HF's.
            div = got * (1.0 / pen) if dev.type == "cuda" else got / pen
            flat[idx] = torch.where(got < 0, got * pen, div)
        pres = [k for k, r in enumerate(rows) if (r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0)
                and r.num_generated > 0]
        if pres:  # OpenAI's: score - (frequency * count + presence * (count > 0)); zero elsewhere
            ks = [slots[k] for k in pres]
            idx, owner = self._gather(ks, [at[k] for k in pres], width, output_only=True)
            tok = idx - torch.from_numpy(np.array([at[k] for k in pres], dtype=np.int64)[owner] * width)
            where = torch.from_numpy(np.array(ks, dtype=np.int64)[owner] * self.vocab) + tok
            counts = self._counts.view(-1)[where].to(dev, scores.dtype)
            freq = _per_token([rows[k].params.frequency_penalty for k in pres], owner)
            presence = _per_token([rows[k].params.presence_penalty for k in pres], owner)
            idx, freq, presence = idx.to(dev), freq.to(dev), presence.to(dev)
            flat[idx] = flat[idx] - (freq * counts + presence * (counts > 0).to(scores.dtype))

    def record(self, slots: list[int], tokens: torch.Tensor | list[int]) -> None:
        """Add ``tokens[i]`` (a tensor on the state's device or the CPU, or a list) to slot ``slots[i]``,
        without a sync."""
        if not slots:
            return
        dev = self._counts.device
        idx = self._index(slots)
        tok = to_device((host_tensor(tokens) if isinstance(tokens, list) else tokens).view(-1).long(), dev)
        if self._seen is not None:
            self._seen.index_put_((idx, tok), torch.ones((), dtype=torch.bool, device=dev))
        self._counts.index_put_((idx, tok), torch.ones((), dtype=torch.float32, device=dev), accumulate=True)
        if self.on_host:
            for s, t in zip(slots, tokens if isinstance(tokens, list) else tok.tolist()):
                self._append(s, t)
        else:
            for s in slots:
                self._length[s] += 1

    # ------------------------------------------------------------------ internals
    def _index(self, slots: list[int]) -> torch.Tensor:
        return to_device(host_tensor(slots), self._counts.device)

    def _gather(self, slots: list[int], at: list[int], width: int, *,
                output_only: bool) -> tuple[torch.Tensor, np.ndarray]:
        """Host layout: flat indices ``at[i] * width + token`` of each slot's tokens (its output only, or all)
        below ``width``, and which of the given slots each came from."""
        parts = [self._hist[s][self._prompt[s] if output_only else 0 : self._length[s]] for s in slots]
        ids = np.concatenate(parts)
        owner = np.repeat(np.arange(len(slots)), [len(p) for p in parts])
        keep = ids < width  # ids past the scores' width cannot be penalised (HF drops them too)
        if not keep.all():
            ids, owner = ids[keep], owner[keep]
        return torch.from_numpy(np.array(at, dtype=np.int64)[owner] * width + ids), owner

    def _append(self, slot: int, token: int) -> None:
        h, n = self._hist[slot], self._length[slot]
        if n == len(h):
            h = self._hist[slot] = np.concatenate([h, np.empty(max(64, n), dtype=np.int64)])
        h[n] = token
        self._length[slot] = n + 1

    def _take(self, owner: Any, device: torch.device, keep: set | frozenset = frozenset()) -> int:
        if not self._free:
            self._sweep(keep)
        if not self._free:
            self._grow(device)
        slot = self._free.pop()
        self._slot[owner] = slot
        self._owner[slot] = owner
        return slot

    def _sweep(self, keep: set | frozenset = frozenset()) -> None:
        """Give back the slots of finished owners (but those in ``keep``)."""
        for owner, slot in list(self._slot.items()):
            if getattr(owner, "finished", False) and owner not in keep:
                del self._slot[owner]
                self._owner[slot] = None
                self._hist[slot] = None
                self._free.append(slot)

    def _grow(self, device: torch.device) -> None:
        cap = len(self._owner)
        new = max(16, 2 * cap)
        counts = torch.zeros(new, self.vocab, dtype=torch.float32, device=device)
        if cap:
            counts[:cap] = self._counts
        self._counts = counts
        if not self.on_host:
            seen = torch.zeros(new, self.vocab, dtype=torch.bool, device=device)
            if cap:
                seen[:cap] = self._seen
            self._seen = seen
        self._owner += [None] * (new - cap)
        self._length += [0] * (new - cap)
        self._hist += [None] * (new - cap)
        self._prompt += [0] * (new - cap)
        self._free += range(new - 1, cap - 1, -1)  # lowest slot first

    def _fill(self, fill: list[tuple[int, "SamplingRow"]]) -> None:
        """Set the given slots from their rows' token lists: every id for ``seen``, the output ones for
        ``counts``. No token is in flight on a first sample; on a refill with tokens in flight (which the
        engine never makes) those cannot be known, and are left out with a warning."""
        rows_s: list[int] = []
        ids_s: list[int] = []
        rows_c: list[int] = []
        ids_c: list[int] = []
        v = self.vocab
        for slot, r in fill:
            toks = r.token_ids
            ahead = _in_flight(r) or 0
            if ahead:
                logger.warning("hf_paged: penalty history of a sequence refilled with %d token(s) in flight; "
                               "they are left out", ahead)
            n, gen = len(toks), max(0, min(r.num_generated - ahead, len(toks)))
            self._length[slot] = n
            if self.on_host:
                h = np.empty(n + max(64, n // 2), dtype=np.int64)
                h[:n] = toks
                self._hist[slot], self._prompt[slot] = h, n - gen
            else:
                kept = [t for t in toks if 0 <= t < v]  # ids past the scores' width cannot be penalised (as HF)
                rows_s += [slot] * len(kept)
                ids_s += kept
            out = [t for t in toks[n - gen:] if 0 <= t < v]
            rows_c += [slot] * len(out)
            ids_c += out
        dev = self._counts.device
        which = to_device(host_tensor([s for s, _ in fill]), dev)
        self._counts.index_fill_(0, which, 0.0)
        if self._seen is not None:
            self._seen.index_fill_(0, which, False)
            if ids_s:
                at = (to_device(host_tensor(rows_s), dev), to_device(host_tensor(ids_s), dev))
                self._seen.index_put_(at, torch.ones((), dtype=torch.bool, device=dev))
        if ids_c:
            at = (to_device(host_tensor(rows_c), dev), to_device(host_tensor(ids_c), dev))
            self._counts.index_put_(at, torch.ones((), dtype=torch.float32, device=dev), accumulate=True)


def _per_token(values: list[float], owner: np.ndarray) -> torch.Tensor:
    """float32 ``values[owner[j]]`` for each gathered token ``j`` (a float32 tensor times a Python float
    and times a float32 tensor of that value give the same bits)."""
    return torch.from_numpy(np.array(values, dtype=np.float32)[owner])
