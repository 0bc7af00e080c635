"""EngineConfig.compile: decode steps through torch.compile (CPU) give the eager engine's tokens.

The compiled forward runs over DecodeGraphs' static buffers with a dynamic batch dimension; the C++
kernels stay opaque calls, traced through their fake (shape-only) versions, which must agree with
the real ops. fp32 tokens must equal the eager engine's (and generate()'s); bf16 logits may differ by
rounding (inductor keeps fused pointwise chains in fp32), so they are compared within a tolerance.
"""
from __future__ import annotations

import logging
import random

import pytest
import torch

import hf_paged
from hf_paged.config import EngineConfig
from hf_paged.engine.pipeline import PagedPipeline
from hf_paged.kernels import cpu
from tiny_models import VOCAB, IdTokenizer, build, load

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs the C++ CPU kernels")


def _prompts(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 50))], rng.randint(1, 30)) for _ in range(n)]


def _run(model, prompts, **engine):
    pipe = PagedPipeline(model, IdTokenizer(), max_num_seqs=6, max_batch_tokens=128, **engine)
    try:
        reqs = [pipe.submit(ids, max_new_tokens=new, do_sample=False) for ids, new in prompts]
        return [r.result(timeout=600).token_ids for r in reqs], pipe.engine.runner.graphs
    finally:
        pipe.close()
        hf_paged.unwrap(model)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_compiled_decode_equals_eager(tiny_root, arch, ahead):
    """Batches of 6 down to 1 as requests finish (both compiled graphs: batch 1 and batch 2..6).
    Gemma3: sliding-window layers, q/k norms on strided views, the (1 + w) norm."""
    model = load(build(arch, tiny_root))
    prompts = _prompts(10, seed=1)
    eager, _ = _run(model, prompts)
    got, graphs = _run(model, prompts, compile=True, async_scheduling=ahead)
    assert graphs is not None and graphs._compiled is not None and graphs.replays > 0
    assert got == eager
    for ids, new in prompts[:3]:
        ref = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, do_sample=False)
        assert eager[prompts.index((ids, new))] == ref[0, len(ids):].tolist()


def test_no_compilation_while_serving(tiny_root):
    """Start-up compiles every variant the batch sizes need: 56 sequences draining to 1 cross the fp32
    linear layers' row thresholds (the C++ kernel up to fp32_skinny_rows() rows, oneDNN above), and serving
    them compiles nothing more."""
    from torch._dynamo.utils import counters

    from hf_paged.kernels.cpu_layers import SKINNY_MAX_ROWS, SKINNY_MAX_ROWS_AVX512, WIDE_SKINNY_MAX_ROWS

    assert 2 < WIDE_SKINNY_MAX_ROWS < SKINNY_MAX_ROWS_AVX512 < SKINNY_MAX_ROWS < 56
    model = load(build("llama", tiny_root))
    pipe = PagedPipeline(model, IdTokenizer(), max_num_seqs=56, max_batch_tokens=2048, compile=True)
    try:
        graphs = pipe.engine.runner.graphs
        compiled = counters["stats"]["unique_graphs"]
        assert compiled > 0
        rng = random.Random(5)
        reqs = [pipe.submit([rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 20))], do_sample=False,
                            max_new_tokens=rng.randint(2, 12), ignore_eos=True) for _ in range(56)]
        for r in reqs:
            r.result(timeout=600)
        assert counters["stats"]["unique_graphs"] == compiled
        assert graphs._compiled is not None and graphs.replays > 0
    finally:
        pipe.close()
        hf_paged.unwrap(model)


def _decode_logits(model, graphs_kw):
    """Logits of one decode step of 5 sequences, through DecodeGraphs (eager or compiled)."""
    pipe = PagedPipeline(model, IdTokenizer(), max_num_seqs=5)
    try:
        runner = pipe.engine.runner
        runner.use_graphs(5, pipe.max_model_len, capture=False, **graphs_kw)
        plans = []
        execute = runner.execute
        runner.execute = lambda plan, prev=None: plans.append(plan) or execute(plan, prev)
        for r in [pipe.submit(ids, max_new_tokens=3, do_sample=False) for ids, _ in _prompts(5, seed=2)]:
            r.result(timeout=600)
        plan = next(p for p in plans if runner.graphs.fits(p) and len(p.ids) == 5)
        return runner.graphs.run(plan).clone()
    finally:
        pipe.close()
        hf_paged.unwrap(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_logits_match_eager(tiny_root, dtype):
    model = load(build("qwen3", tiny_root)).to(dtype)
    eager = _decode_logits(model, {})
    compiled = _decode_logits(model, {"compile": True})
    scale = eager.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * scale)
    else:
        assert (compiled - eager).abs().max().item() <= 0.05 * scale


def test_failed_compiled_step_falls_back_to_eager(tiny_root, caplog):
    model = load(build("llama", tiny_root))
    prompts = _prompts(4, seed=3)
    eager, _ = _run(model, prompts)
    pipe = PagedPipeline(model, IdTokenizer(), max_num_seqs=6, max_batch_tokens=128, compile=True)
    graphs = pipe.engine.runner.graphs
    assert pipe.stats().decode_path == "compiled"

    def broken(**kwargs):
        raise RuntimeError("a recompile failed")

    graphs._compiled = broken
    try:
        with caplog.at_level(logging.WARNING, logger="hf_paged"):
            got = [pipe.submit(ids, max_new_tokens=new, do_sample=False).result(timeout=600).token_ids
                   for ids, new in prompts]
    finally:
        pipe.close()
        hf_paged.unwrap(model)
    assert got == eager
    assert graphs._compiled is None and "decode steps run eagerly" in caplog.text
    assert graphs.mode == "static"  # the static buffers, eagerly: what stats and /metrics then report


def test_compile_option_is_validated():
    with pytest.raises(ValueError, match="compile must be true or false"):
        EngineConfig(compile="yes")
    assert EngineConfig.from_kwargs(compile=True).compile is True


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def test_fake_kernels_agree_with_the_ops():
    """Each C++ op's fake gives the real op's output shape, dtype and strides (torch.library.opcheck)."""
    ops = torch.ops.hf_paged_cpu
    x, w = _rand(3, 16), _rand(8, 16)
    strided = _rand(2, 4, 16).transpose(0, 1)  # a non-contiguous input: outputs are still contiguous
    kc, vc = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    cases = [
        (ops.skinny_linear.default, (x, w, None)),
        (ops.skinny_linear_bf16.default, (x.bfloat16(), w.bfloat16(), None, True)),
        (ops.rms_norm.default, (strided, _rand(16), 1e-6, 0.0)),
        (ops.rms_norm_bf16.default, (strided.bfloat16(), _rand(16, dtype=torch.bfloat16), 1e-6, 1.0, False)),
        (ops.argmax_rows.default, (x,)),
        (ops.argmax_logprob_rows.default, (x,)),
        (ops.write_kv.default, (_rand(3, 2, 8), _rand(3, 2, 8), kc, vc, torch.tensor([0, 5, -1]))),
        (ops.paged_decode.default, (_rand(2, 4, 8), kc, vc, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                                    torch.tensor([0, 1, 2], dtype=torch.int32),
                                    torch.tensor([5, 3], dtype=torch.int32), torch.zeros(2, 4, 8), 0.3, 0, 0.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    from hf_paged.kernels.cpu_layers import onednn_linear

    if torch.backends.mkldnn.is_available():
        torch.library.opcheck(onednn_linear, (x, w, None), test_utils=("test_schema", "test_faketensor"))
