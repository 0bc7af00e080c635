"""PagedPipeline: greedy parity with generate(), preemption, prefix caching, sampling, concurrency."""
from __future__ import annotations

import random

import pytest
import torch

import hf_paged
from hf_paged.engine.pipeline import PagedPipeline
from tiny_models import VOCAB, IdTokenizer, build, load

ENGINE_ARCHS = ["llama", "gemma2", "gpt2", "opt", "qwen3", "phi3", "gpt_neox", "gemma3_text"]


def _prompts(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    lens = [1, 300, 2, 17, 64, 128, 5, 33, 250, 9, 16, 15, 100, 3, 48, 77][:n]
    return [([rng.randrange(3, VOCAB) for _ in range(n_)], rng.randint(1, 64)) for n_ in lens]


def _reference(model, prompts) -> list[list[int]]:
    outs = []
    for ids, new in prompts:
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, do_sample=False)
        outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="module", params=ENGINE_ARCHS)
def case(request, tiny_root):
    """(model, prompts, per-prompt generate() outputs), computed once per architecture."""
    model = load(build(request.param, tiny_root))
    prompts = _prompts(16)
    return model, prompts, _reference(model, prompts)


def _run(model, prompts, **engine):
    pipe = PagedPipeline(model, IdTokenizer(), **engine)
    try:
        reqs = [pipe.submit(ids, max_new_tokens=new, do_sample=False) for ids, new in prompts]
        res = [r.result(timeout=300) for r in reqs]
        return [r.token_ids for r in res], pipe.stats()
    finally:
        pipe.close()
        hf_paged.unwrap(model)


def test_greedy_matches_generate_per_prompt(case):
    model, prompts, ref = case
    got, stats = _run(model, prompts, num_blocks=512, block_size=16, max_batch_tokens=256)
    assert got == ref
    assert stats["preemptions"] == 0


def test_fused_greedy_head_matches_generate(case, monkeypatch):
    """The fused LM head + argmax (CPU, every step here, from one row up) gives generate()'s tokens."""
    from hf_paged.engine import runner
    from hf_paged.kernels import cpu

    model, prompts, ref = case
    monkeypatch.setattr(runner, "FUSED_HEAD_MIN_ROWS", 1)
    calls = []
    real = cpu.head_argmax
    monkeypatch.setattr(cpu, "head_argmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    got, _ = _run(model, prompts, num_blocks=512, block_size=16, max_batch_tokens=256)
    assert got == ref
    assert bool(calls) == (runner.fused_head(model) is not None) == (cpu.available() and model.config.model_type
                                                                     != "gemma2")


def test_preemption_keeps_outputs_identical(case):
    model, prompts, ref = case
    # 48 blocks of 8 tokens hold the longest sequence (364 tokens) but not 16 sequences at once.
    got, stats = _run(model, prompts, num_blocks=48, block_size=8, max_batch_tokens=128)
    assert stats["preemptions"] > 0
    assert got == ref
