"""PagedPipeline: greedy parity with generate(), preemption, prefix caching, sampling, concurrency."""
from __future__ import annotations

import random
import time

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


def test_generate_keeps_only_each_requests_output_and_gives_what_submit_gives(tiny_root, monkeypatch):
    """generate()'s requests are read for their results alone: their token events are not kept (a batch job
    would hold one per token until its request ends). The results equal submit()'s, event for event."""
    model = load(build("llama", tiny_root))
    prompts = [ids for ids, _ in _prompts(6, seed=3)]
    kw = dict(max_new_tokens=12, num_return_sequences=2, do_sample=True, seed=4, logprobs=True, prompt_logprobs=1,
              stop=["17"])
    pipe = PagedPipeline(model, IdTokenizer(), num_blocks=256, block_size=8, enable_prefix_caching=False)
    try:
        made = []
        real = pipe._enqueue
        monkeypatch.setattr(pipe, "_enqueue", lambda reqs: made.extend(reqs) or real(reqs))
        quiet = pipe.generate(prompts, **kw)
        assert len(made) == len(prompts) and all(r.quiet for r in made)
        assert all(r._events.qsize() == 1 for r in made)  # the last event, with the output
        streamed = real([pipe._make_request(p, kw) for p in prompts])  # queued at once, as generate() does
        assert all(len(list(h)) > 1 for h in streamed)
        for a, h in zip(quiet, streamed):
            b = h.result(timeout=60)
            assert [(o.token_ids, o.text, o.finish_reason, o.stop_string) for o in a.outputs] == \
                [(o.token_ids, o.text, o.finish_reason, o.stop_string) for o in b.outputs]
            for oa, ob in zip(a.outputs, b.outputs):
                assert oa.logprobs == pytest.approx(ob.logprobs, abs=1e-5)
            assert [e and e[0] for e in a.prompt_logprobs] == pytest.approx([e and e[0] for e in b.prompt_logprobs],
                                                                            abs=1e-5)
        assert pipe.stats()["blocks_used"] == 0
    finally:
        pipe.close()
        hf_paged.unwrap(model)


def test_work_queued_as_the_loop_ends_is_refused_not_left_waiting(tiny_root):
    """close() may come between a submit's check and its put. An add or call put after the loop took its last
    inbox items would never be answered (its result() waits forever): once the loop is past them, they are
    refused at once."""
    pipe = PagedPipeline(load(build("llama", tiny_root)), IdTokenizer(), num_blocks=64, block_size=8)
    try:
        assert pipe.generate([5, 6, 7], max_new_tokens=2).token_ids
        pipe._inbox.put(("stop", None))  # the loop stops as for close(), which has not set _closed yet
        pipe._thread.join(timeout=30)
        assert not pipe._thread.is_alive() and not pipe._closed
        with pytest.raises(RuntimeError, match="pipeline is closed"):
            pipe.submit([5, 6, 7], max_new_tokens=2)
        with pytest.raises(RuntimeError, match="pipeline is closed"):
            pipe.unload_adapter("none")
    finally:
        pipe.close()
    assert pipe.pool.allocator.num_used == 0


def test_a_base_exception_in_a_step_still_ends_every_request(tiny_root, monkeypatch):
    """Not an Exception (SystemExit, say): the engine thread ends, but not before failing what runs, so no caller
    waits forever; the pipeline then refuses new work as broken."""
    from hf_paged.engine import stepping

    pipe = PagedPipeline(load(build("llama", tiny_root)), IdTokenizer(), num_blocks=64, block_size=8)
    try:
        monkeypatch.setattr(stepping.Stepper, "step", lambda self: (_ for _ in ()).throw(SystemExit(3)))
        h = pipe.submit([5, 6, 7], max_new_tokens=4)
        with pytest.raises(RuntimeError, match="the engine thread ended: SystemExit: 3"):
            h.result(timeout=30)
        pipe._thread.join(timeout=30)
        assert not pipe.alive
        with pytest.raises(RuntimeError, match="pipeline is broken: the engine thread ended"):
            pipe.submit([5, 6, 7], max_new_tokens=2)
    finally:
        pipe.close()
    assert pipe.pool.allocator.num_used == 0


def test_changed_weights_do_not_serve_cached_prefixes(tiny_root):
    """An RL loop (update the weights in place, roll out again) or load_state_dict between two requests: the
    prefix cache holds K/V of the old weights, which must not serve the next request. Edits through ``.data``
    leave no trace; reset_prefix_cache() is for them."""
    model = load(build("llama", tiny_root))
    prompt = [random.Random(0).randrange(3, VOCAB) for _ in range(40)]
    pipe = PagedPipeline(model, IdTokenizer(), num_blocks=64, block_size=8)
    try:
        pipe.generate(prompt, max_new_tokens=4, do_sample=False)
        layers = model.model.layers
        with torch.no_grad():  # as an optimizer step does it
            for layer in layers:
                layer.self_attn.k_proj.weight.mul_(-1.7)
        after_step = pipe.generate(prompt, max_new_tokens=12, do_sample=False).token_ids
        ref_step = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        model.load_state_dict({f"model.layers.{i}.self_attn.v_proj.weight": layer.self_attn.v_proj.weight * 1.9
                               for i, layer in enumerate(layers)}, strict=False, assign=True)
        after_load = pipe.generate(prompt, max_new_tokens=12, do_sample=False).token_ids
        ref_load = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        for layer in layers:
            layer.self_attn.k_proj.weight.data.mul_(0.5)
        pipe.reset_prefix_cache()
        after_data = pipe.generate(prompt, max_new_tokens=12, do_sample=False).token_ids
        ref_data = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        unchanged = pipe.generate(prompt, max_new_tokens=12, do_sample=False).token_ids
        assert pipe.stats().prefix_hit_rate > 0  # the cache still serves while the weights stay put
    finally:
        pipe.close()
        hf_paged.unwrap(model)
    assert after_step == ref_step[0, 40:].tolist()
    assert after_load == ref_load[0, 40:].tolist()
    assert after_data == unchanged == ref_data[0, 40:].tolist()


def test_a_prompt_that_encodes_to_no_tokens_is_refused(tiny_root):
    """It would take the logits row of the sequence packed before it (or fail every request if alone)."""
    from hf_paged.engine.params import SamplingParams

    model = load(build("llama", tiny_root))
    pipe = PagedPipeline(model, IdTokenizer(), num_blocks=64, block_size=8)
    try:
        with pytest.raises(ValueError, match="encodes to no tokens"):
            pipe.submit("   ", max_new_tokens=2)  # IdTokenizer: no ids in blank text
        with pytest.raises(ValueError, match="encodes to no tokens"):
            pipe.engine.add([], SamplingParams.from_request(None, max_new_tokens=1))
        assert pipe.generate("5 6", max_new_tokens=2, do_sample=False).token_ids
    finally:
        pipe.close()
        hf_paged.unwrap(model)


def test_a_request_waiting_for_blocks_held_outside_the_engine_waits_without_spinning(tiny_root, monkeypatch):
    """A wrapped model's generate() (or a PagedKVCache kept by its caller) holds blocks of the pipeline's pool:
    the request that does not fit waits, trying every STALL_S instead of spinning a core, and runs once the
    blocks come back."""
    from hf_paged.engine import stepping

    model = load(build("llama", tiny_root))
    pipe = PagedPipeline(model, IdTokenizer(), num_blocks=8, block_size=8)
    steps = []
    real = stepping.Stepper.step
    monkeypatch.setattr(stepping.Stepper, "step", lambda self: (steps.append(1), real(self))[1])
    from hf_paged.kv.cache import PagedKVCache

    held = PagedKVCache(pipe.pool)  # a cache its caller keeps, after a forward of 48 tokens
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([list(range(3, 51))]), past_key_values=held, use_cache=True)
        assert pipe.pool.allocator.num_used == 6
        handle = pipe.submit(list(range(3, 30)), max_new_tokens=4, do_sample=False)
        time.sleep(0.5)
        assert not handle.done and len(steps) < 0.5 / stepping.STALL_S
        held.release()
        assert len(handle.result(timeout=60).token_ids) == 4
    finally:
        held.release()
        pipe.close()
        hf_paged.unwrap(model)


def test_a_model_made_under_inference_mode_is_served(tiny_root):
    """Its parameters are inference tensors, which keep no version counter (the weights check must not fail)."""
    import transformers as tf

    with torch.inference_mode():
        model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(build("llama", tiny_root))).eval()
    assert model.lm_head.weight.is_inference()
    pipe = PagedPipeline(model, IdTokenizer(), num_blocks=64, block_size=8)
    try:
        assert len(pipe.generate([5, 6, 7], max_new_tokens=3, do_sample=False).token_ids) == 3
    finally:
        pipe.close()
        hf_paged.unwrap(model)
