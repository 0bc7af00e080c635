"""The fused greedy head (engine/greedy_head.py): the tokens of the whole-logits path, on every
architecture it takes, in every scheduling mode; steps that need logits keep them. (Greedy requests
have one sequence each: num_return_sequences > 1 needs sampling, which is never fused.)"""
from __future__ import annotations

import pytest
import torch

import hf_paged
from hf_paged.engine import greedy_head
from hf_paged.engine.greedy_head import GreedyHead
from hf_paged.engine.pipeline import PagedPipeline
from test_pipeline import ENGINE_ARCHS, _prompts, _reference
from tiny_models import IdTokenizer, build, load


@pytest.fixture
def always_fused(monkeypatch):
    """The fused path for every greedy step (not only from 2^23 logits on), counting its calls."""
    monkeypatch.setattr(greedy_head, "MIN_LOGITS", 0)
    calls = []
    real = GreedyHead.tokens
    monkeypatch.setattr(GreedyHead, "tokens", lambda self, hidden: calls.append(hidden.shape[0]) or real(self, hidden))
    return calls


def _generate(model, prompts, *, mode=None, stats=None, **engine):
    modes = {None: {}, "async": dict(async_scheduling=True), "overlap": dict(overlap=True, async_scheduling=False)}
    pipe = PagedPipeline(model, IdTokenizer(), **modes[mode], **engine)
    try:
        reqs = [pipe.submit(ids, max_new_tokens=new, do_sample=False) for ids, new in prompts]
        out = [[o.token_ids for o in r.result(timeout=300).outputs] for r in reqs]
        if stats is not None:
            stats.append(pipe.stats())
        return out
    finally:
        pipe.close()
        hf_paged.unwrap(model)


@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_fused_head_gives_generates_tokens(arch, tiny_root, always_fused):
    model = load(build(arch, tiny_root))
    prompts = _prompts(12)
    ref = _reference(model, prompts)
    got = _generate(model, prompts, num_blocks=512, block_size=16, max_batch_tokens=256)
    assert [g[0] for g in got] == ref
    if arch == "gemma2":  # a final logit soft-cap: left to the whole-logits path
        assert not always_fused
    else:
        assert len(always_fused) > 10 and max(always_fused) > 1


@pytest.mark.parametrize("mode", ["async", "overlap"])
def test_fused_head_under_async_scheduling_and_preemption(mode, tiny_root, always_fused):
    model = load(build("llama", tiny_root))
    prompts = _prompts(8, seed=3)
    ref = _reference(model, prompts)
    # 48 blocks of 8 tokens cannot hold every sequence at once: preemption, recomputation, prefix hits.
    pipe_stats = []
    got = _generate(model, prompts, mode=mode, num_blocks=48, block_size=8, max_batch_tokens=96, stats=pipe_stats)
    assert [g[0] for g in got] == ref
    assert pipe_stats[0]["preemptions"] > 0 and always_fused


def test_fused_head_equals_the_whole_logits_in_bf16(tiny_root, monkeypatch):
    model = load(build("qwen3", tiny_root)).to(torch.bfloat16)
    prompts = _prompts(10, seed=5)
    plain = _generate(model, prompts, num_blocks=512, block_size=16)
    monkeypatch.setattr(greedy_head, "MIN_LOGITS", 0)
    fused = _generate(model, prompts, num_blocks=512, block_size=16)
    assert fused == plain


def test_steps_that_need_logits_keep_them(tiny_root, always_fused):
    """A row asking for log-probabilities, or sampling, makes its steps unfused; the greedy rows' tokens
    stay generate()'s, and the fused path resumes once those rows are done."""
    model = load(build("llama", tiny_root))
    prompts = _prompts(6, seed=7)
    ref = _reference(model, prompts)
    pipe = PagedPipeline(model, IdTokenizer(), num_blocks=512, block_size=16)
    try:
        lp = pipe.submit(prompts[0][0], max_new_tokens=3, do_sample=False, logprobs=True, top_logprobs=2)
        sampled = pipe.submit(prompts[1][0], max_new_tokens=4, do_sample=True, seed=1)
        greedy = [pipe.submit(ids, max_new_tokens=new, do_sample=False) for ids, new in prompts[2:]]
        out = lp.result(timeout=300).outputs[0]
        assert out.token_ids == ref[0][:3] and len(out.logprobs) == len(out.token_ids)
        assert all(isinstance(v, float) for v in out.logprobs)
        assert all(len(t) == 2 for t in out.top_logprobs)
        assert len(sampled.result(timeout=300).outputs[0].token_ids) == 4
        assert [r.result(timeout=300).outputs[0].token_ids for r in greedy] == ref[2:]
    finally:
        pipe.close()
        hf_paged.unwrap(model)
    assert always_fused  # the steps after the logprobs and sampling rows finished


def test_only_plain_heads_are_fused(tiny_root, monkeypatch):
    model = load(build("llama", tiny_root))
    assert GreedyHead.for_model(model) is not None
    model.config.logit_scale = 0.5  # something applied after the head
    assert GreedyHead.for_model(model) is None
    model.config.logit_scale = None
    monkeypatch.setenv("HF_PAGED_FUSED_HEAD", "0")
    assert GreedyHead.for_model(model) is None
    monkeypatch.delenv("HF_PAGED_FUSED_HEAD")
    assert GreedyHead.for_model(load(build("gemma2", tiny_root))) is None
    head = GreedyHead.for_model(model)
    assert head.wanted(2**23 // head.vocab + 1) and not head.wanted(2**23 // head.vocab - 1)
