"""Many LoRA adapters in one engine: the segmented LoRA kernels against their torch reference, a mixed
batch of base + 3 adapters (different ranks and targets) against PEFT's own generate() of each, load
and unload while running, the prefix cache kept apart per adapter, and the errors."""
from __future__ import annotations

import os
import random
import threading

import pytest
import torch
import transformers
from tiny_models import LORA_ADAPTERS, IdTokenizer, build, load, save_lora_adapters

import hf_paged
from hf_paged import kernels
from hf_paged.kernels import cpu as cpu_kernels
from hf_paged.kernels import reference
from hf_paged.lora import LoraBatch
from hf_paged.lora.layers import LayerWeights

peft = pytest.importorskip("peft")
# HF_PAGED_TEST_CUDA=1 (benchmarks/gpu_check.sh): the Triton kernels compiled on the GPU, not interpreted.
ON_CUDA = os.environ.get("HF_PAGED_TEST_CUDA") == "1" and torch.cuda.is_available()

ADAPTERS = LORA_ADAPTERS
PROMPTS = [[1, 5, 9, 12, 7], [1, 44, 3, 90, 17, 23, 51, 8, 61, 11, 4, 77, 30], [1, 200, 13],
           [1, 7, 7, 8, 100, 101, 102, 103, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_root, tmp_path_factory):
    base_path = build("llama", tiny_root)
    return base_path, save_lora_adapters(base_path, tmp_path_factory.mktemp("adapters"))


def _reference(base_path, adapter_dir, prompt, n=10, device="cpu"):
    model = load(base_path).to(device)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    out = model.generate(input_ids=torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def references(adapter_dirs):
    base_path, dirs = adapter_dirs
    refs = {(None, i): _reference(base_path, None, p) for i, p in enumerate(PROMPTS)}
    for name, d in dirs.items():
        refs.update({(name, i): _reference(base_path, d, p) for i, p in enumerate(PROMPTS)})
    for name in dirs:  # each adapter changes the output
        assert any(refs[(name, i)] != refs[(None, i)] for i in range(len(PROMPTS))), name
    return refs


# ------------------------------------------------------------------ kernels
def _stacks(ranks, K, N, R, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(len(ranks), R, K, dtype=dtype)
    b = torch.zeros(len(ranks), N, R, dtype=dtype)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, K, generator=g, dtype=dtype) * 0.3
        b[s, :, :r] = torch.randn(N, r, generator=g, dtype=dtype) * 0.3
    return a, b


def _oracle(out, x, a, b, ranks, scales, segments):
    want = out.double().clone()
    for start, end, slot in segments:
        r = ranks[slot]
        want[start:end] += (x[start:end].double() @ a[slot, :r].double().T) @ b[slot, :, :r].double().T * scales[slot]
    return want


def _batch(segments, T):
    """The LoraBatch of ``segments`` over T packed tokens (base tokens between them)."""
    slots, lens, at = [], [], 0
    for start, end, slot in segments:
        if start > at:
            slots.append(None)
            lens.append(start - at)
        slots.append(slot)
        lens.append(end - start)
        at = end
    slots.append(None)
    lens.append(T - at)
    batch = LoraBatch.build(slots, lens, torch.device("cpu"))
    assert batch.segments == segments
    return batch


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_segmented_lora_matches_the_oracle(backend, strided):
    if backend == "cpu" and not cpu_kernels.available():
        pytest.skip("the C++ CPU kernel did not build here")
    T, K, N, R = 45, 52, 75, 32  # K and N not multiples of 8 or 16: the kernels' tails run
    ranks, scales = [8, 0, 20, 32], [2.0, 1.0, 0.5, 0.25]  # slot 1 does not target this layer
    dev = "cuda" if backend == "triton" and ON_CUDA else "cpu"
    a, b = (t.to(dev) for t in _stacks(ranks, K, N, R))
    if strided:  # views with the same values over other layouts (b as a transposed [S, R, N])
        a, b = a.transpose(1, 2).contiguous().transpose(1, 2), b.transpose(1, 2).contiguous().transpose(1, 2)
        assert not a.is_contiguous() and not b.is_contiguous()
    x = torch.randn(T, K, device=dev)
    out = torch.randn(T, N, device=dev)
    # Base tokens before, between and after; segments longer than a tile (4 rows in C++, 16 in Triton).
    segments = [(2, 21, 0), (21, 24, 2), (26, 30, 1), (30, 44, 3)]
    want = _oracle(out, x, a, b, ranks, scales, segments)
    got = out.clone()
    kernels.lora_add(got, x, LayerWeights.of(a, b, ranks, scales), _batch(segments, T), backend=backend)
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    base_rows = [0, 1, 24, 25, 26, 27, 28, 29, 44]  # base tokens and the rank-0 slot's are untouched
    assert torch.equal(got[base_rows], out[base_rows])


# Triton's interpreter cannot compute in bf16 (numpy has no bf16): bf16 runs on the device only.
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_CUDA else []))
def test_segmented_lora_half_triton_matches_the_reference(dtype):
    T, K, N, R = 20, 64, 40, 16
    dev = "cuda" if ON_CUDA else "cpu"
    ranks, scales = [16, 4], [1.0, 2.0]
    a, b = (t.to(dev) for t in _stacks(ranks, K, N, R, dtype=dtype))
    x = torch.randn(T, K, dtype=dtype, device=dev)
    out = torch.randn(T, N, dtype=dtype, device=dev)
    segments = [(0, 12, 1), (12, 20, 0)]
    batch = LoraBatch.build([1, 0], [12, 8], torch.device(dev))
    want, got = out.float(), out.clone()
    reference.lora_add(want, x.float(), a.float(), b.float(), ranks, scales, segments)
    kernels.lora_add(got, x, LayerWeights.of(a, b, ranks, scales), batch, backend="triton")
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)


def test_lora_batch_merges_runs_of_one_adapter():
    batch = LoraBatch.build([None, 0, 0, 2, None, 1], [3, 1, 4, 2, 5, 1], torch.device("cpu"))
    assert batch.segments == [(3, 8, 0), (8, 10, 2), (15, 16, 1)]
    assert LoraBatch.build([None, None], [4, 1], torch.device("cpu")).segments == []


# ------------------------------------------------------------------ the engine
def _pipe(base_path, dirs, **kw):
    kw.setdefault("num_blocks", 96)
    return hf_paged.PagedPipeline(load(base_path), IdTokenizer(), lora_adapters=dirs, **kw)


@pytest.mark.parametrize("max_batch_tokens,backend", [(2048, "auto"), (16, "auto"), (2048, "torch"),
                                                      (2048, "fused")])
def test_mixed_batch_of_base_and_three_adapters_equals_each_alone(adapter_dirs, references, max_batch_tokens, backend,
                                                                  monkeypatch):
    """16 tokens a step: prompts are chunked across steps. "torch": the matmul per segment path instead
    of the C++ kernel (and the torch attention). "fused": every step through the fused greedy LM head."""
    calls = []
    if backend == "fused":
        from hf_paged.engine import runner
        from hf_paged.kernels import cpu

        if not cpu.available():
            pytest.skip("C++ CPU kernel not built")
        monkeypatch.setattr(runner, "FUSED_HEAD_MIN_ROWS", 1)
        real = cpu.head_argmax
        monkeypatch.setattr(cpu, "head_argmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    elif backend != "auto":
        monkeypatch.setenv("HF_PAGED_BACKEND", backend)
    base_path, dirs = adapter_dirs
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in (None, *ADAPTERS)]
    with _pipe(base_path, dirs, max_batch_tokens=max_batch_tokens) as pipe:
        assert sorted(pipe.adapter_names) == sorted(ADAPTERS)
        handles = [pipe.submit(PROMPTS[i], adapter=name, max_new_tokens=10, do_sample=False, ignore_eos=True)
                   for name, i in jobs]
        got = {job: h.result().token_ids for job, h in zip(jobs, handles)}
    for job in jobs:
        assert got[job] == references[job], job
    assert bool(calls) == (backend == "fused")


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA and HF_PAGED_TEST_CUDA=1")
def test_mixed_batch_on_cuda_runs_the_triton_kernels(adapter_dirs):
    """On the GPU (fp32, TF32 off): base + 3 adapters in one batch equal PEFT's generate() of each there."""
    torch.backends.cuda.matmul.allow_tf32 = False
    base_path, dirs = adapter_dirs
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in (None, *ADAPTERS)]
    refs = {(name, i): _reference(base_path, dirs.get(name), PROMPTS[i], device="cuda") for name, i in jobs}
    with hf_paged.PagedPipeline(load(base_path).cuda(), IdTokenizer(), lora_adapters=dirs, num_blocks=96) as pipe:
        handles = [pipe.submit(PROMPTS[i], adapter=name, max_new_tokens=10, do_sample=False, ignore_eos=True)
                   for name, i in jobs]
        got = {job: h.result().token_ids for job, h in zip(jobs, handles)}
    assert got == refs


def test_the_callers_plain_model_still_generates_as_the_base(adapter_dirs, references):
    base_path, dirs = adapter_dirs
    model = load(base_path)
    with hf_paged.PagedPipeline(model, IdTokenizer(), lora_adapters=dirs, num_blocks=64) as pipe:
        assert pipe.generate(PROMPTS[0], adapter="mlp", max_new_tokens=10, do_sample=False,
                             ignore_eos=True).token_ids == references[("mlp", 0)]
        # PEFT injected the LoRA layers into the caller's model; its own generate() is still the base.
        out = model.generate(input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert out[0, len(PROMPTS[0]):].tolist() == references[(None, 0)]


def test_a_batch_without_adapters_runs_the_base_path(adapter_dirs, references):
    base_path, _ = adapter_dirs
    with hf_paged.PagedPipeline(load(base_path), IdTokenizer(), num_blocks=64) as pipe:
        assert not pipe.adapters.has_layers  # no LoRA layer: the model's forward is untouched
        outs = pipe.generate(PROMPTS, max_new_tokens=10, do_sample=False, ignore_eos=True)
    assert [o.token_ids for o in outs] == [references[(None, i)] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("record", [False, True], ids=["buffers", "recorded"])
@pytest.mark.parametrize("source", ["config", "peft_model"])
def test_decode_graphs_serve_base_steps_of_a_lora_pipeline(adapter_dirs, references, record, source):
    """With LoRA layers in the model the decode graphs are captured (and their static buffers run) as the base
    model: decode steps with no adapter token replay them, steps with one run eagerly, and every request gets
    PEFT's own tokens. Before, every step of a LoRA pipeline carried adapter slots, so the graphs captured at
    start were never used. A PeftModel passed in keeps its adapter active: run as PEFT's forward, the graphs
    would apply it to every row."""
    from graph_replay import RecordingGraphs

    base_path, dirs = adapter_dirs
    if source == "config":
        pipe = _pipe(base_path, dirs, max_num_seqs=8)
    else:
        model = peft.PeftModel.from_pretrained(load(base_path), dirs["attn"], adapter_name="attn").eval()
        model.load_adapter(dirs["mlp"], adapter_name="mlp")
        pipe = hf_paged.PagedPipeline(model, IdTokenizer(), num_blocks=96, max_num_seqs=8)
    with pipe:
        runner = pipe.engine.runner
        runner.use_graphs(8, pipe.max_model_len, capture=record, graph_api=RecordingGraphs() if record else None)
        graphs = runner.graphs
        base = pipe.generate(PROMPTS, max_new_tokens=10, do_sample=False, ignore_eos=True)
        assert [o.token_ids for o in base] == [references[(None, i)] for i in range(len(PROMPTS))]
        assert graphs.replays > 0
        before = graphs.replays
        jobs = [(name, i) for i in range(len(PROMPTS)) for name in ("attn", None)]
        handles = [pipe.submit(PROMPTS[i], adapter=name, max_new_tokens=10, do_sample=False, ignore_eos=True)
                   for name, i in jobs]
        assert {job: h.result().token_ids for job, h in zip(jobs, handles)} == {job: references[job] for job in jobs}
        alone = pipe.generate(PROMPTS[0], adapter="mlp", max_new_tokens=10, do_sample=False, ignore_eos=True)
        assert alone.token_ids == references[("mlp", 0)]
        assert graphs.replays == before  # every decode step had adapter tokens
        runner.graphs = None


def test_seeded_sampling_per_adapter_is_batch_independent(adapter_dirs):
    base_path, dirs = adapter_dirs
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.0, seed=7, ignore_eos=True)
    with _pipe(base_path, dirs) as pipe:
        alone = pipe.generate(PROMPTS[1], adapter="mlp", **kw).token_ids
        mixed = [pipe.submit(PROMPTS[1], adapter=name, **kw) for name in ("attn", "mlp", None, "all")]
        assert mixed[1].result().token_ids == alone
        assert len({tuple(h.result().token_ids) for h in mixed}) > 1


def test_load_and_unload_while_running(adapter_dirs, references):
    base_path, dirs = adapter_dirs
    with _pipe(base_path, {"attn": dirs["attn"]}) as pipe:
        long = pipe.submit(PROMPTS[3], adapter="attn", max_new_tokens=200, do_sample=False, ignore_eos=True)
        events = iter(long)
        next(events)  # it is running
        pipe.load_adapter("mlp", dirs["mlp"])
        with pytest.raises(ValueError, match="in use by 1"):
            pipe.unload_adapter("attn")
        with pytest.raises(ValueError, match="already loaded"):
            pipe.load_adapter("mlp", dirs["mlp"])
        assert pipe.generate(PROMPTS[0], adapter="mlp", max_new_tokens=10, do_sample=False,
                             ignore_eos=True).token_ids == references[("mlp", 0)]
        long.cancel()
        long.result()
        pipe.unload_adapter("attn")
        with pytest.raises(ValueError, match="'attn' is not loaded; loaded adapters: 'mlp'"):
            pipe.submit(PROMPTS[0], adapter="attn")
        # Loaded again under another name, from many threads at once: one engine thread applies them.
        errors = []

        def load(name):
            try:
                pipe.load_adapter(name, dirs["all"])
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=load, args=(f"all{k}",)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and sorted(pipe.adapter_names) == ["all0", "all1", "all2", "mlp"]
        outs = pipe.generate([PROMPTS[2]] * 3, adapter="all1", max_new_tokens=10, do_sample=False, ignore_eos=True)
        assert [o.token_ids for o in outs] == [references[("all", 2)]] * 3


def test_a_request_queued_for_an_unloaded_adapter_fails_alone(adapter_dirs, references):
    base_path, dirs = adapter_dirs
    with _pipe(base_path, {"attn": dirs["attn"]}) as pipe:
        req = pipe._make_request(PROMPTS[0], dict(adapter="attn", max_new_tokens=4))
        pipe.unload_adapter("attn")
        pipe._enqueue([req])
        with pytest.raises(RuntimeError, match="'attn' was unloaded"):
            req.result(timeout=30)
        assert pipe.generate(PROMPTS[0], max_new_tokens=10, do_sample=False,
                             ignore_eos=True).token_ids == references[(None, 0)]


def test_prefix_cache_never_mixes_adapters(adapter_dirs, references):
    base_path, dirs = adapter_dirs
    prompt = PROMPTS[3]  # 22 tokens: one full block of 16 to share
    with _pipe(base_path, dirs, block_size=16) as pipe:
        alloc = pipe.pool.allocator
        kw = dict(max_new_tokens=10, do_sample=False, ignore_eos=True)
        assert pipe.generate(prompt, adapter="attn", **kw).token_ids == references[("attn", 3)]
        hits = alloc.prefix_hits
        for name in (None, "mlp", "all"):  # the same tokens, other adapters: no reuse
            assert pipe.generate(prompt, adapter=name, **kw).token_ids == references[(name, 3)]
            assert alloc.prefix_hits == hits, name
        assert pipe.generate(prompt, adapter="attn", **kw).token_ids == references[("attn", 3)]
        assert alloc.prefix_hits == hits + 1  # the same adapter again: its block is reused
        # An adapter unloaded and loaded again under the same name gets new blocks (its weights may differ).
        pipe.unload_adapter("attn")
        pipe.load_adapter("attn", dirs["mlp"])
        assert pipe.generate(prompt, adapter="attn", **kw).token_ids == references[("mlp", 3)]
        assert alloc.prefix_hits == hits + 1


def test_adapter_errors_are_clear(adapter_dirs, tmp_path):
    base_path, dirs = adapter_dirs
    with _pipe(base_path, {"attn": dirs["attn"]}, max_lora_rank=8) as pipe:
        with pytest.raises(ValueError, match="'nope' is not loaded; loaded adapters: 'attn'"):
            pipe.generate(PROMPTS[0], adapter="nope")
        with pytest.raises(ValueError, match="rank 16 exceeds the largest served rank 8"):
            pipe.load_adapter("mlp", dirs["mlp"])
        with pytest.raises(ValueError, match="cannot read a PEFT adapter config"):
            pipe.load_adapter("x", str(tmp_path / "missing"))
        ia3 = peft.get_peft_model(load(base_path), peft.IA3Config(target_modules=["q_proj"],
                                                                  feedforward_modules=[]))
        ia3.save_pretrained(tmp_path / "ia3")
        with pytest.raises(ValueError, match="only LoRA adapters"):
            pipe.load_adapter("ia3", str(tmp_path / "ia3"))
        small = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)
        other = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(small),
                                    peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        other.save_pretrained(tmp_path / "other")
        with pytest.raises(ValueError, match="'other' does not fit this model"):
            pipe.load_adapter("other", str(tmp_path / "other"))
        before = [pipe.generate(PROMPTS[1], adapter=a, max_new_tokens=4, do_sample=False, ignore_eos=True).token_ids
                  for a in ("attn", None)]
        # The engine runs the output layer on the sampled rows only: LoRA on lm_head is refused at load (it
        # failed every request of that adapter on CPU, and read past its rows on CUDA), as are whole trained
        # modules (modules_to_save), which the batched path does not serve.
        for bad, extra, match in (("head", dict(target_modules=["q_proj", "lm_head"]), "output layer"),
                                  ("mts", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                   "modules_to_save")):
            peft.get_peft_model(load(base_path), peft.LoraConfig(r=4, init_lora_weights=False, **extra)) \
                .save_pretrained(tmp_path / bad)
            with pytest.raises(ValueError, match=match):
                pipe.load_adapter(bad, str(tmp_path / bad))
        assert sorted(pipe.adapter_names) == ["attn"]
        after = [pipe.generate(PROMPTS[1], adapter=a, max_new_tokens=4, do_sample=False, ignore_eos=True).token_ids
                 for a in ("attn", None)]
        assert after == before and len(after[0]) == 4  # still serving, the same tokens
    with pytest.raises(ValueError, match="lora_adapters must be name=path"):
        hf_paged.EngineConfig(lora_adapters="attn")


def test_the_lora_benchmark_runs(tmp_path):
    """benchmarks/lora_throughput.py --dry-run: 2 layers of the default model, 4 adapters, 8 requests."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "rounds.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "lora_throughput.py"), "--dry-run",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = json.loads(out.read_text())["rounds"]
    assert len(rounds) == 1 and rounds[0]["none"] > 0 and rounds[0]["lora"] > 0


def test_adapters_that_would_change_the_shared_model_are_refused(adapter_dirs, tmp_path):
    """Adapters the batched path cannot serve as they were trained are refused at load, and leave the base model
    as it was: biases PEFT would load into the shared base layers (bias="all"), copied decoder layers
    (layer_replication), LoRA variants (aLoRA), merged weights, transformers-loaded adapters, and a first load
    that fails halfway (PEFT has then wrapped some layers already)."""
    base_path, dirs = adapter_dirs
    prompt = PROMPTS[1]
    with _pipe(base_path, None) as pipe:  # no adapter yet: the first load makes the PeftModel
        base_tokens = pipe.generate(prompt, max_new_tokens=6, do_sample=False, ignore_eos=True).token_ids
        cfg = transformers.AutoConfig.from_pretrained(base_path)
        cfg.intermediate_size += 32
        wider = transformers.AutoModelForCausalLM.from_config(cfg)
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
        peft.get_peft_model(wider, lora).save_pretrained(tmp_path / "partial")  # q_proj fits, up_proj does not
        with pytest.raises(ValueError, match="'partial' does not fit this model"):
            pipe.load_adapter("partial", str(tmp_path / "partial"))
        for bad, extra, match in (("bias", dict(bias="all"), "bias='all' is not supported"),
                                  ("rep", dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
                                  ("alora", dict(alora_invocation_tokens=[5, 9]), "aLoRA")):
            lora = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, **extra)
            peft.get_peft_model(load(base_path), lora).save_pretrained(tmp_path / bad)
            with pytest.raises(ValueError, match=match):
                pipe.load_adapter(bad, str(tmp_path / bad))
        assert pipe.adapter_names == []
        assert pipe.generate(prompt, max_new_tokens=6, do_sample=False, ignore_eos=True).token_ids == base_tokens
        pipe.load_adapter("attn", dirs["attn"])  # a good one still loads, and the base is still the base
        assert pipe.generate(prompt, max_new_tokens=6, do_sample=False, ignore_eos=True).token_ids == base_tokens
    merged = peft.PeftModel.from_pretrained(load(base_path), dirs["attn"]).eval()
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights"):
        hf_paged.PagedPipeline(merged, IdTokenizer(), num_blocks=32)
    hf_paged.unwrap(merged)
    loaded = load(base_path)
    loaded.load_adapter(dirs["attn"])
    with pytest.raises(ValueError, match="load_adapter"):
        hf_paged.PagedPipeline(loaded, IdTokenizer(), num_blocks=32)
    hf_paged.unwrap(loaded)


def test_adapters_of_a_later_pipeline_on_the_same_model_miss_the_earlier_ones_blocks(adapter_dirs):
    """The KV pool, and its prefix cache, belong to the model and outlive a pipeline; an adapter's uid salts its
    cached blocks. A second pipeline's first adapter must not get the uid (and so the blocks) of the first's."""
    base_path, dirs = adapter_dirs
    prompt = [random.Random(1).randrange(3, 250) for _ in range(40)]
    ref = _reference(base_path, dirs["mlp"], prompt, n=10)
    model = load(base_path)
    outs = []
    for name in ("attn", "mlp"):
        pipe = hf_paged.PagedPipeline(model, IdTokenizer(), num_blocks=64, block_size=8,
                                      lora_adapters={name: dirs[name]})
        try:
            outs.append(pipe.generate(prompt, max_new_tokens=10, do_sample=False, ignore_eos=True,
                                      adapter=name).token_ids)
        finally:
            pipe.close()
    hf_paged.unwrap(model)
    assert outs[1] == ref
