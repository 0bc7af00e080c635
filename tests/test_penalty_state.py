"""PenaltyState: rows that name their sequence (``SamplingRow.owner``, as the engine's rows do) take their
repetition, frequency and presence penalties from per-sequence state that the sampler updates with each
token it picks. They must pick exactly what the same rows pick from their token lists, in both samplers,
while sequences come and go (slots reused), with a token in flight, and after a list grew behind the
sampler's back."""
from __future__ import annotations

import random

import pytest
import torch

from hf_paged.engine.device_sampler import DeviceSampler
from hf_paged.engine.params import SamplingParams
from hf_paged.engine.sampler import Sampler, SamplingRow

V = 300
SAMPLERS = {"host": Sampler, "device": DeviceSampler}
KINDS = [dict(repetition_penalty=1.6, logprobs=True, top_logprobs=3), dict(frequency_penalty=1.5),
         dict(presence_penalty=-1.0, repetition_penalty=0.7),
         dict(do_sample=True, temperature=0.9, top_k=0, repetition_penalty=1.3, frequency_penalty=0.4, logprobs=True),
         dict(do_sample=True, top_k=20, presence_penalty=1.5),
         dict(min_new_tokens=3, eos_token_id=[5], presence_penalty=2.0),
         dict(no_repeat_ngram_size=2, repetition_penalty=1.2, frequency_penalty=0.3), dict()]


class Owner:
    """What a row names: the engine passes its Sequence; the state only reads ``finished``."""

    def __init__(self) -> None:
        self.finished = False


def _params(kind: int, seed: int) -> SamplingParams:
    kw = dict(KINDS[kind % len(KINDS)])
    return SamplingParams(max_new_tokens=1000, seed=seed if kw.get("do_sample") else None, **kw)


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_tracked_rows_pick_what_their_token_lists_pick(kind):
    """Thirty steps of a changing batch: sequences finish (their slots go to newcomers) and join; every
    step both samplers' picks agree, and the penalties do change picks (the test can fail)."""
    rng = random.Random(0)
    tracked, listed = SAMPLERS[kind](V), SAMPLERS[kind](V)
    seqs: list[dict] = []

    def join(n: int) -> None:
        for _ in range(n):
            i = len(seqs)
            ids = [rng.randrange(V) for _ in range(rng.randint(1, 60))]
            seqs.append(dict(ids=ids, prompt=len(ids), params=_params(i, i), owner=Owner(),
                             gens=(torch.Generator().manual_seed(i), torch.Generator().manual_seed(i))))

    join(20)
    changed = 0
    for step in range(30):
        live = [s for s in seqs if not s["owner"].finished]
        # Flat, close scores: the penalties decide many picks.
        logits = torch.randn(len(live), V, generator=torch.Generator().manual_seed(step)) * 0.3
        rows_t = [SamplingRow(s["params"], s["ids"], len(s["ids"]) - s["prompt"], s["gens"][0], s["owner"])
                  for s in live]
        rows_l = [SamplingRow(s["params"], list(s["ids"]), len(s["ids"]) - s["prompt"], s["gens"][1])
                  for s in live]
        out_t, out_l = tracked.sample(logits.clone(), rows_t), listed.sample(logits.clone(), rows_l)
        got, want = out_t.tokens, out_l.tokens
        assert got == want, f"step {step}"
        # Log-probabilities of the processed scores, compared exactly: the penalised scores are bit for bit equal.
        assert out_t.logprobs == out_l.logprobs and out_t.top_logprobs == out_l.top_logprobs, f"step {step}"
        changed += sum(t != a for t, a, s in zip(got, logits.argmax(-1).tolist(), live)
                       if not s["params"].do_sample)
        for s, t in zip(live, got):
            s["ids"].append(t)
        if step % 5 == 4:  # some finish, others join: the newcomers take the finished ones' slots
            for s in live[::3]:
                s["owner"].finished = True
            join(len(live[::3]))
    assert changed > 30
    assert len(tracked.penalties._owner) == 32  # grown once past 16 slots, and not again: slots were reused


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_a_token_in_flight_is_counted(kind):
    """Async scheduling: a row samples before its previous token reached its list (num_generated counts
    it); the state recorded that token when it was picked."""
    sampler = SAMPLERS[kind](V)
    p = SamplingParams(max_new_tokens=100, repetition_penalty=1.8, frequency_penalty=1.0)
    owner, ids = Owner(), [7, 8, 9]
    logits = torch.zeros(1, V)
    logits[0, 40] = 1.0  # greedy picks 40 first; then 40 is penalised and 41 wins
    logits[0, 41] = 0.9
    first = sampler.sample(logits.clone(), [SamplingRow(p, ids, 0, None, owner)]).tokens
    assert first == [40]
    # The next step samples with 40 still in flight: the list lacks it, num_generated counts it.
    second = sampler.sample(logits.clone(), [SamplingRow(p, ids, 1, None, owner)]).tokens
    assert second == [41]
    ref = Sampler(V).sample(logits.clone(), [SamplingRow(p, ids + [40], 1, None)]).tokens
    assert second == ref


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_a_list_that_grew_without_the_sampler_is_read_again(kind):
    sampler = SAMPLERS[kind](V)
    p = SamplingParams(max_new_tokens=100, repetition_penalty=3.0)
    owner, ids = Owner(), [1, 2]
    logits = torch.zeros(1, V)
    logits[0, 50], logits[0, 51] = 1.0, 0.9
    assert sampler.sample(logits.clone(), [SamplingRow(p, ids, 0, None, owner)]).tokens == [50]
    ids += [50, 50]  # the caller appended tokens the state never saw (and one it did)
    # ids is [1, 2, 50, 50]: 4 tokens, 3 recorded. Read again from the list: 50 penalised, 51 wins.
    assert sampler.sample(logits.clone(), [SamplingRow(p, ids, 2, None, owner)]).tokens == [51]
    assert sampler.penalties._length[sampler.penalties.slots([SamplingRow(p, ids + [51], 3, None, owner)],
                                                            logits.device)[0]] == 5


def test_ids_past_the_scores_width_are_ignored_as_hf_does():
    """A prompt may hold ids the LM head has no column for (an embedding wider than the head): HF's
    processor drops them; so does the state, also when the sampler's vocabulary is wider than the scores."""
    p = SamplingParams(max_new_tokens=10, repetition_penalty=1.5, presence_penalty=0.5)
    ids = [3, V + 2, V + 7, 3, 9]
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    tracked = Sampler(V + 10).sample(logits.clone(), [SamplingRow(p, ids, 2, None, Owner()),
                                                      SamplingRow(p, ids, 0, None, Owner())])
    listed = Sampler(V + 10).sample(logits.clone(), [SamplingRow(p, ids, 2, None), SamplingRow(p, ids, 0, None)])
    assert tracked.tokens == listed.tokens


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_an_owner_that_says_what_is_in_flight(kind, caplog):
    """The engine's owners carry ``num_ahead``: the state's length must be the list's plus that, exactly. A
    mismatch is refilled from the list; tokens in flight then cannot be known and are left out, with a
    warning (the engine never gets there: this checks that it would not corrupt the counts silently)."""
    sampler = SAMPLERS[kind](V)
    p = SamplingParams(max_new_tokens=100, frequency_penalty=1.0)
    owner, ids = Owner(), [7, 8, 9]
    owner.num_ahead = 0
    logits = torch.zeros(1, V)
    logits[0, 40], logits[0, 41] = 1.0, 0.9
    assert sampler.sample(logits.clone(), [SamplingRow(p, ids, 0, None, owner)]).tokens == [40]
    owner.num_ahead = 1  # 40 in flight: the list lacks it, the state has it (no refill, no warning)
    assert sampler.sample(logits.clone(), [SamplingRow(p, ids, 1, None, owner)]).tokens == [41]
    assert "refilled" not in caplog.text
    # Then the list gets 40 and 41 but claims 41 still in flight: the state (5 tokens) is not the list's 5
    # plus 1. Refilled from the list with a warning; the in-flight count keeps the prompt's last token out
    # of the output counts.
    with caplog.at_level("WARNING", logger="hf_paged"):
        sampler.sample(logits.clone(), [SamplingRow(p, ids + [40, 41], 3, None, owner)])
    assert "refilled" in caplog.text
    counts = sampler.penalties._counts[sampler.penalties._slot[owner]]
    assert counts[9].item() == 0 and counts[40].item() >= 1 and counts[41].item() >= 1
    assert counts.sum().item() == 3  # 40 and 41 from the list, then this step's pick


def test_low_precision_logits_read_the_lists():
    """The host layout takes float32 scores (the engine's); bf16 logits passed straight to a Sampler take the
    token-list path for every row, owner or not, and give what rows without an owner get."""
    p = SamplingParams(max_new_tokens=10, repetition_penalty=1.3, frequency_penalty=0.3, presence_penalty=0.7)
    ids = [4, 5, 6, 4, 9, 9]
    logits = (torch.randn(2, V, generator=torch.Generator().manual_seed(2)) * 0.3).bfloat16()
    owned = Sampler(V).sample(logits.clone(), [SamplingRow(p, ids, 3, None, Owner()), SamplingRow(p, ids, 0, None,
                                                                                                   Owner())])
    plain = Sampler(V).sample(logits.clone(), [SamplingRow(p, ids, 3, None), SamplingRow(p, ids, 0, None)])
    assert owned.tokens == plain.tokens


def test_a_call_never_sweeps_its_own_rows():
    """Every slot is held and one holder has finished; a call with that holder and a newcomer must not give
    the newcomer the holder's slot (the sweep that frees it leaves this call's rows alone)."""
    from hf_paged.engine.penalty_state import PenaltyState

    state = PenaltyState(V)
    p = SamplingParams(max_new_tokens=10, repetition_penalty=1.2)
    owners = [Owner() for _ in range(16)]
    state.slots([SamplingRow(p, [1, 2], 0, None, o) for o in owners], torch.device("cpu"))
    owners[0].finished = True
    new = Owner()
    slots = state.slots([SamplingRow(p, [1, 2], 0, None, owners[0]), SamplingRow(p, [3], 0, None, new)],
                        torch.device("cpu"))
    assert slots[0] != slots[1]
    assert len(state._owner) == 32  # grown instead
