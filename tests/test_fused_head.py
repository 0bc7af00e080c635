"""The fused greedy LM head on CPU (kernels/cpu.head_argmax; Runner/Engine's ``pick`` steps): the same ids
as argmax over the model's own logits, the same logprobs to rounding, and only where it applies."""
from __future__ import annotations

import pytest
import torch

import hf_paged
from hf_paged.engine import runner as runner_mod
from hf_paged.engine.engine import Engine
from hf_paged.engine.params import SamplingParams
from hf_paged.engine.pipeline import PagedPipeline
from hf_paged.kernels import cpu
from tiny_models import ARCHS, VOCAB, IdTokenizer, build, load

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"C++ CPU kernel not built: {cpu.build_error()}")


def _reference(x, weight, bias, vocab):
    logits = torch.nn.functional.linear(x, weight, bias)[:, :vocab]
    ids = logits.argmax(-1)
    return ids, torch.log_softmax(logits, -1).gather(1, ids.view(-1, 1)).view(-1)


@pytest.mark.parametrize("rows,hidden,vocab", [(1, 32, 300), (3, 64, 1000), (17, 64, 49152), (256, 64, 20000),
                                               (40, 576, 5000)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_head_argmax_equals_the_logits_argmax(rows, hidden, vocab, with_bias):
    g = torch.Generator().manual_seed(rows + hidden)
    weight = torch.randn(vocab + 7, hidden, generator=g)  # a padded output layer: only `vocab` columns count
    bias = torch.randn(vocab + 7, generator=g) if with_bias else None
    x = torch.randn(rows, hidden, generator=g)
    ids, lps = cpu.head_argmax(x, weight, bias, vocab, logprob=True)
    want_ids, want_lps = _reference(x, weight, bias, vocab)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(lps, want_lps, atol=2e-5, rtol=1e-5)
    only_ids, none = cpu.head_argmax(x, weight, bias, vocab)
    assert none is None and torch.equal(only_ids, want_ids)


def test_head_argmax_ties_nan_and_infinities_as_torch():
    """Exact ties across chunk boundaries give the first index; a NaN column wins from its index on; a row
    with every score -inf picks 0; a non-finite maximum gives a NaN logprob (as log_softmax)."""
    g = torch.Generator().manual_seed(0)
    vocab, hidden, rows = 20000, 16, 64  # 64 rows: chunks of 4096 columns
    x = torch.randn(rows, hidden, generator=g).abs() + 0.1
    weight = torch.randn(vocab, hidden, generator=g)
    for col in (5000, 9000, 12288):  # the same top score in three chunks
        weight[col] = 50.0
    bias = torch.zeros(vocab)
    ids, _ = cpu.head_argmax(x, weight, bias, vocab)
    assert ids.tolist() == [5000] * rows
    weight[9000, 0] = float("nan")  # column 9000 is NaN in every row: argmax takes a row's first NaN
    want, _ = _reference(x, weight, bias, vocab)
    ids, lps = cpu.head_argmax(x, weight, bias, vocab, logprob=True)
    assert torch.equal(ids, want) and ids.tolist() == [9000] * rows and lps.isnan().all()
    weight[9000, 0] = 0.0
    bias[:] = float("-inf")  # every score -inf
    ids, lps = cpu.head_argmax(x, weight, bias, vocab, logprob=True)
    assert torch.equal(ids, _reference(x, weight, bias, vocab)[0]) and ids.tolist() == [0] * rows
    assert lps.isnan().all()
    bias[:] = 0.0
    bias[15000] = float("inf")
    ids, lps = cpu.head_argmax(x, weight, bias, vocab, logprob=True)
    assert ids.tolist() == [15000] * rows and lps.isnan().all()


def test_head_argmax_refuses_what_it_cannot_read():
    x, w = torch.zeros(2, 8), torch.zeros(10, 8)
    with pytest.raises(RuntimeError, match="float32"):
        cpu.head_argmax(x.double(), w.double(), None, 10)
    with pytest.raises(RuntimeError, match="x is"):
        cpu.head_argmax(torch.zeros(2, 4), w, None, 10)
    with pytest.raises(RuntimeError, match="vocab"):
        cpu.head_argmax(x, w, None, 11)
    with pytest.raises(RuntimeError, match="bias"):
        cpu.head_argmax(x, w, torch.zeros(9), 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_head_accepts_only_models_whose_logits_are_the_head_of_the_base(arch, tiny_root):
    """The allow-list's promise, per architecture: logits == output_layer(base_model(...)[0]), exactly."""
    model = load(build(arch, tiny_root))
    found = runner_mod.fused_head(model)
    if arch == "gemma2":  # final logit soft-capping
        assert found is None
        return
    assert found is not None
    base, head, vocab = found
    assert vocab == VOCAB
    ids = torch.randint(3, VOCAB, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(head(base(input_ids=ids)[0]), model(input_ids=ids).logits)


def test_fused_head_refusals(tiny_root, monkeypatch):
    model = load(build("llama", tiny_root))
    assert runner_mod.fused_head(model) is not None
    assert runner_mod.fused_head(model.to(torch.bfloat16)) is None  # fp32 only
    model.float()
    monkeypatch.setattr(runner_mod, "FUSED_HEAD_MAX_HIDDEN", 32)
    assert runner_mod.fused_head(model) is None
    monkeypatch.undo()
    monkeypatch.setenv("HF_PAGED_FUSED_HEAD", "0")
    assert runner_mod.fused_head(model) is None


def _counting(monkeypatch) -> list[tuple[int, bool]]:
    calls: list[tuple[int, bool]] = []
    real = cpu.head_argmax

    def counted(x, weight, bias, vocab, logprob=False):
        calls.append((x.shape[0], logprob))
        return real(x, weight, bias, vocab, logprob)
    monkeypatch.setattr(cpu, "head_argmax", counted)
    return calls


def _prompts(n):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist()
            for k in torch.randint(1, 90, (n,), generator=g)]


def _generate(pipe, prompts, **kw):
    reqs = [pipe.submit(p, max_new_tokens=12 + i % 7, **kw) for i, p in enumerate(prompts)]
    return [r.result(timeout=300) for r in reqs]


def _serve(model, prompts, **kw):
    """_generate on a fresh pipeline (96 tokens a step), closed and unwrapped after."""
    pipe = PagedPipeline(model, IdTokenizer(), num_blocks=256, block_size=8, max_batch_tokens=96)
    try:
        return _generate(pipe, prompts, **kw)
    finally:
        pipe.close()
        hf_paged.unwrap(model)


@pytest.mark.parametrize("logprobs", [False, True])
def test_pipeline_fused_equals_unfused(tiny_root, monkeypatch, logprobs):
    """The same tokens (and logprobs, to rounding) with the fused head as through the logits; both paths
    really ran; every block comes back (the autouse invariant check)."""
    model = load(build("qwen3", tiny_root))
    prompts = _prompts(20)
    monkeypatch.setattr(runner_mod, "FUSED_HEAD_MIN_ROWS", 1)
    calls = _counting(monkeypatch)
    fused = _serve(model, prompts, do_sample=False, logprobs=logprobs)
    assert calls and all(lp == logprobs for _, lp in calls)
    monkeypatch.setenv("HF_PAGED_FUSED_HEAD", "0")
    calls.clear()
    plain = _serve(model, prompts, do_sample=False, logprobs=logprobs)
    assert not calls
    assert [r.token_ids for r in fused] == [r.token_ids for r in plain]
    for a, b in zip(fused, plain):
        if logprobs:
            assert a.logprobs == pytest.approx(b.logprobs, abs=2e-5)
        else:
            assert not a.logprobs and not b.logprobs


def test_only_plain_greedy_rows_are_picked(tiny_root, monkeypatch):
    """A sampled row, a penalty, top logprobs, a grammar or a minimum length still to reach keeps its row on
    the logits; the plain greedy rows next to it are picked; chunks that do not sample are no rows."""
    from hf_paged.engine.scheduler import ScheduledSeq, Schedule
    from hf_paged.engine.sequence import Sequence

    def sched(*params, generated=3):
        seqs = []
        for i, p in enumerate(params):
            seq = Sequence(i, list(range(10 + generated)), 10, p)
            seqs.append(ScheduledSeq(seq, 1, 10 + generated - 1, [0], [], True))  # its decode token
        return Schedule(seqs)

    greedy = SamplingParams(max_new_tokens=8)
    assert Engine._greedy_pick(sched(greedy, greedy)) == ([0, 1], False)
    assert Engine._greedy_pick(sched(greedy, SamplingParams(max_new_tokens=8, logprobs=True))) == ([0, 1], True)
    for odd in (dict(do_sample=True), dict(repetition_penalty=1.1), dict(frequency_penalty=0.5),
                dict(presence_penalty=0.5), dict(no_repeat_ngram_size=2), dict(logprobs=True, top_logprobs=2),
                dict(min_new_tokens=5, eos_token_id=[2]), dict(regex="[a-z]+")):
        p = SamplingParams(max_new_tokens=8, **odd)
        mixed, alone = sched(p, greedy, p), sched(p, p)
        if p.constraint is not None:  # the engine gives such a sequence a matcher
            for entry in (mixed.seqs[0], mixed.seqs[2], *alone.seqs):
                entry.seq.matcher = object()
        assert Engine._greedy_pick(mixed) == ([1], False), odd
        assert Engine._greedy_pick(alone) is None, odd
    # The minimum reached: picked.
    assert Engine._greedy_pick(sched(greedy, SamplingParams(max_new_tokens=8, min_new_tokens=3, eos_token_id=[2],
                                                            logprobs=True))) == ([0, 1], True)
    s = sched(SamplingParams(max_new_tokens=8, do_sample=True), greedy)
    # A chunk ending before its last token does not sample.
    s.seqs[0].start, s.seqs[0].num_tokens, s.seqs[0].samples = 0, 5, False
    assert Engine._greedy_pick(s) == ([0], False)


def test_mixed_steps_pick_the_greedy_rows_and_sample_the_others(tiny_root, monkeypatch):
    """Greedy rows (some with logprobs) next to seeded sampled rows (with top logprobs): the picked rows and
    the rows sampled from the remaining logits give what the logits path gives, token for token."""
    model = load(build("llama", tiny_root))
    prompts = _prompts(24)

    def run():
        pipe = PagedPipeline(model, IdTokenizer(), num_blocks=256, block_size=8, max_batch_tokens=128)
        try:
            reqs = []
            for i, p in enumerate(prompts):
                kw = dict(do_sample=False, logprobs=i % 3 == 0) if i % 2 else dict(
                    do_sample=True, seed=i, temperature=0.8, top_k=20, logprobs=True, top_logprobs=2)
                reqs.append(pipe.submit(p, max_new_tokens=10 + i % 5, **kw))
            return [r.result(timeout=300) for r in reqs]
        finally:
            pipe.close()
            hf_paged.unwrap(model)

    monkeypatch.setattr(runner_mod, "FUSED_HEAD_MIN_ROWS", 1)
    calls = _counting(monkeypatch)
    mixed = []
    real = Engine._picked
    monkeypatch.setattr(Engine, "_picked",
                        lambda self, fwd: mixed.append(fwd.logits.rest is not None) or real(self, fwd))
    fused = run()
    assert calls and any(mixed)  # steps with both picked and sampled rows ran
    monkeypatch.setenv("HF_PAGED_FUSED_HEAD", "0")
    plain = run()
    assert [r.token_ids for r in fused] == [r.token_ids for r in plain]
    for i, (a, b) in enumerate(zip(fused, plain)):
        a, b = a.outputs[0], b.outputs[0]
        if i % 2 and i % 3:  # greedy without logprobs
            assert not a.logprobs and not b.logprobs
            continue
        assert a.logprobs == pytest.approx(b.logprobs, abs=2e-5)
        assert len(a.logprobs) == len(a.token_ids)
        assert [[t for t, _ in top] for top in a.top_logprobs or []] == \
            [[t for t, _ in top] for top in b.top_logprobs or []]
        assert bool(a.top_logprobs) == (i % 2 == 0)  # the sampled rows ask for top lists


@pytest.mark.parametrize("ahead", [False, True])
def test_overlapped_and_async_steps_pick_and_match_generate(tiny_root, monkeypatch, ahead):
    """The overlapped loop (and async scheduling, whose next step takes the ids from the step in flight)
    with every step picked: generate()'s tokens, every block back."""
    model = load(build("phi3", tiny_root))
    prompts = _prompts(12)
    ref = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=12 + i % 7, do_sample=False)[0, len(p):]
           .tolist() for i, p in enumerate(prompts)]
    monkeypatch.setattr(runner_mod, "FUSED_HEAD_MIN_ROWS", 1)
    calls = _counting(monkeypatch)
    pipe = PagedPipeline(model, IdTokenizer(), num_blocks=256, block_size=8, max_batch_tokens=64, overlap=True,
                         async_scheduling=ahead)
    try:
        got = [r.token_ids for r in _generate(pipe, prompts, do_sample=False)]
    finally:
        pipe.close()
        hf_paged.unwrap(model)
    assert got == ref and calls


def test_rows_below_min_new_tokens_take_the_logits_and_match_generate(tiny_root, monkeypatch):
    """Rows that may not end yet are not picked (their EOS is suppressed in the sampler); once their minimum is
    reached they are: generate(min_new_tokens=...)'s tokens, with an EOS each row's first greedy token."""
    model = load(build("llama", tiny_root))
    prompts = _prompts(16)
    with torch.inference_mode():  # each prompt's own first greedy token as its EOS: the minimum matters
        firsts = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    ref = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=8, min_new_tokens=4, eos_token_id=e,
                          do_sample=False)[0, len(p):].tolist() for p, e in zip(prompts, firsts)]
    monkeypatch.setattr(runner_mod, "FUSED_HEAD_MIN_ROWS", 1)
    calls = _counting(monkeypatch)
    pipe = PagedPipeline(model, IdTokenizer(), num_blocks=256, block_size=8, max_batch_tokens=2048)
    try:
        reqs = [pipe.submit(p, max_new_tokens=8, min_new_tokens=4, eos_token_id=[e], do_sample=False)
                for p, e in zip(prompts, firsts)]
        got = [r.result(timeout=300).token_ids for r in reqs]
    finally:
        pipe.close()
        hf_paged.unwrap(model)
    assert calls  # picked after the minimum
    assert got == ref


def test_mixed_batches_take_both_paths_and_match_generate(tiny_root, monkeypatch):
    """Greedy requests next to sampled ones: the greedy rows are picked (from one row up here, where they are
    at least half the step), the sampled ones sample; the greedy outputs equal generate() throughout."""
    model = load(build("llama", tiny_root))
    prompts = _prompts(10)
    ref = []
    for i, p in enumerate(prompts):
        out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=12 + i % 7, do_sample=False)
        ref.append(out[0, len(p):].tolist())
    monkeypatch.setattr(runner_mod, "FUSED_HEAD_MIN_ROWS", 1)
    calls = _counting(monkeypatch)
    pipe = PagedPipeline(model, IdTokenizer(), num_blocks=256, block_size=8, max_batch_tokens=128)
    try:
        greedy = [pipe.submit(p, max_new_tokens=12 + i % 7, do_sample=False) for i, p in enumerate(prompts)]
        sampled = [pipe.submit(p, max_new_tokens=4, do_sample=True, seed=i) for i, p in enumerate(prompts[:3])]
        got = [r.result(timeout=300).token_ids for r in greedy]
        for r in sampled:
            assert len(r.result(timeout=300).token_ids) == 4
    finally:
        pipe.close()
        hf_paged.unwrap(model)
    assert got == ref
    assert calls  # once the sampled requests ended, the greedy steps picked
