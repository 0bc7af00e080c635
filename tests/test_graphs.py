"""DecodeGraphs: decode steps over static, padded buffers give the eager runner's tokens.

On CPU the buffers run eagerly (``capture=False``): that checks the bucketing, padding and in-place
filling without a GPU. "recorded" runs capture each bucket's forward with graph_replay's recorder and
replay only the recorded ops, every Python value frozen at capture as in a CUDA graph: that checks the
forward reads nothing from the host that changes between steps. The CUDA tests (skipped here, run by
benchmarks/gpu_check.sh) compare captured graphs with ``enforce_eager`` in fp32 and bf16.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

import hf_paged
from hf_paged.engine.graphs import bucket_sizes
from hf_paged.engine.pipeline import PagedPipeline
from graph_replay import RecordingGraphs
from tiny_models import ARCHS, VOCAB, IdTokenizer, build, load

CUDA = torch.cuda.is_available()


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    b = bucket_sizes(256)
    assert b[:6] == [1, 2, 4, 8, 16, 24] and b[-1] == 256 and 64 in b and 80 in b
    assert b == sorted(set(b))
    assert bucket_sizes(300)[-2:] == [288, 300]


def _prompts(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, VOCAB) for _ in range(40)]  # prefix-cache hits for every third prompt
    out = []
    for i in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 60))]
        out.append((shared + ids if i % 3 == 0 else ids, rng.randint(1, 40)))
    return out


def _draining(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """``n`` prompts wanting 1..n new tokens (run with ignore_eos): once their prefills are done, one
    sequence ends per step, so the decode batch takes every size from at most ``n`` down to 1."""
    rng = random.Random(seed)
    return [([rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))], i + 1) for i in range(n)]


def _run(model, prompts, *, graphs: bool, capture: bool = False, sampling: bool = False, record: bool = False,
         top: bool = False, ignore_eos: bool = False, **engine):
    """``graphs`` on CPU: the static buffers run eagerly, or with ``record`` captured and replayed by
    graph_replay's recorder; ``capture``: real CUDA graphs (the pipeline's own). ``top``: greedy with the
    top-5 logprobs of every token, and the request outputs returned instead of the token lists."""
    pipe = PagedPipeline(model, IdTokenizer(), enforce_eager=not capture, **engine)
    runner = pipe.engine.runner
    if graphs and not capture:
        runner.use_graphs(pipe.config.max_num_seqs, pipe.max_model_len, capture=record,
                          graph_api=RecordingGraphs() if record else None)
    try:
        kw = dict(do_sample=True, temperature=0.9, num_return_sequences=2) if sampling else dict(do_sample=False)
        if top:
            kw.update(logprobs=True, top_logprobs=5)
        if ignore_eos:
            kw.update(ignore_eos=True)
        reqs = [pipe.submit(ids, max_new_tokens=new, seed=i, **kw) for i, (ids, new) in enumerate(prompts)]
        res = [r.result(timeout=600) for r in reqs]
        return res if top else [[o.token_ids for o in r.outputs] for r in res], pipe.stats(), runner.graphs
    finally:
        pipe.close()
        hf_paged.unwrap(model)


@pytest.fixture(scope="module")
def llama(tiny_root):
    return load(build("llama", tiny_root))


MODES = pytest.mark.parametrize("record", [False, True], ids=["buffers", "recorded"])


@MODES
@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_static_buffers_equal_eager_greedy(llama, ahead, record):
    """Every bucket of max_num_seqs=12 (1, 2, 4, 8, 12) is used as the batch drains; prefix hits.
    Async: the ids still in flight go into the static input buffer on the device."""
    prompts = _prompts(20)
    eager, _, _ = _run(llama, prompts, graphs=False, max_num_seqs=12, max_batch_tokens=256, async_scheduling=False)
    got, stats, graphs = _run(llama, prompts, graphs=True, max_num_seqs=12, max_batch_tokens=256,
                              async_scheduling=ahead, record=record)
    assert got == eager
    assert graphs.replays > 0 and stats["prefix_hit_rate"] > 0
    assert stats["graph_steps"] == graphs.replays and stats["decode_path"] == ("cuda_graphs" if record else "static")
    if record:
        assert graphs.captured and sum(g.replays for g in graphs.api.graphs) == graphs.replays
    for ids, new in prompts[:3]:  # and both equal generate()
        ref = llama.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, do_sample=False)
        assert eager[prompts.index((ids, new))][0] == ref[0, len(ids):].tolist()


@MODES
@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_static_buffers_equal_eager_preemption_and_n(llama, ahead, record):
    prompts = _prompts(10, seed=1)
    opts = dict(num_blocks=40, block_size=8, max_num_seqs=8, max_batch_tokens=64)
    eager, _, _ = _run(llama, prompts, graphs=False, sampling=True, async_scheduling=False, **opts)
    got, stats, graphs = _run(llama, prompts, graphs=True, sampling=True, async_scheduling=ahead, record=record,
                              **opts)
    assert got == eager
    assert stats["preemptions"] > 0 and graphs.replays > 0


@MODES
@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_static_buffers_every_bucket(llama, ahead, record):
    """A batch that drains one sequence per step replays every bucket (1, 2, 4, 8, 12) and each size
    within them (padding rows from 0 to 3), with the eager tokens."""
    prompts = _draining(12, seed=9)
    opts = dict(max_num_seqs=12, max_batch_tokens=256, ignore_eos=True)
    eager, _, _ = _run(llama, prompts, graphs=False, async_scheduling=False, **opts)
    got, _, graphs = _run(llama, prompts, graphs=True, async_scheduling=ahead, record=record, **opts)
    assert got == eager and [len(t[0]) for t in got] == [new for _, new in prompts]
    assert sorted(graphs.replays_by_bucket) == graphs.buckets == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("arch", ARCHS)
def test_recorded_graphs_every_architecture(tiny_root, arch):
    """Each supported architecture's decode forward, captured and replayed with nothing re-run but the
    recorded ops, gives the plain loop's greedy tokens (buckets 1, 2, 4, 6 as the batch drains)."""
    model = load(build(arch, tiny_root))
    prompts = _prompts(9, seed=6)
    opts = dict(max_num_seqs=6, max_batch_tokens=128)
    eager, _, _ = _run(model, prompts, graphs=False, **opts)
    got, _, graphs = _run(model, prompts, graphs=True, record=True, **opts)
    assert got == eager and graphs.captured and graphs.replays > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_engine_steps_make_no_host_sync(tiny_root, arch):
    """No op of an eager step's forward (prefill, mixed and decode) makes the host wait for the device:
    on CUDA one would stall async scheduling, which launches the next step while this one runs."""
    from graph_replay import SyncWatch

    from hf_paged.engine.runner import Runner

    watch = SyncWatch()
    execute = Runner.execute

    def watched(self, plan, prev_ids=None):
        with watch:
            return execute(self, plan, prev_ids)

    model = load(build(arch, tiny_root))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Runner, "execute", watched)
        _run(model, _prompts(6, seed=8), graphs=False, max_num_seqs=4, max_batch_tokens=64)
    assert not watch.seen, watch.seen


def test_recorder_catches_what_eager_buffers_miss(llama, monkeypatch):
    """The recorder is strict where re-running the forward is not: a host sync inside the forward fails
    the capture, and a value read from the host at capture is frozen into every replay."""
    from graph_replay import HostSyncInCapture

    import hf_paged.attention as attention

    paged = attention.kernels.paged_attention
    prompts = _prompts(8, seed=5)
    opts = dict(max_num_seqs=4, max_batch_tokens=128)
    eager, _, _ = _run(llama, prompts, graphs=False, **opts)

    # 1. The longest context read from the device (an .item()) instead of the static table width.
    monkeypatch.setattr(attention.kernels, "paged_attention",
                        lambda *a, **k: paged(*a, **{**k, "max_seqlen_k": int(a[5].max())}))
    assert _run(llama, prompts, graphs=True, **opts)[0] == eager  # eager buffers: fine
    with pytest.raises(HostSyncInCapture, match="aten.item"):
        _run(llama, prompts, graphs=True, record=True, **opts)

    # 2. Context lengths copied through host memory (numpy, outside the dispatcher): frozen at capture,
    # where every row is padding of length 0.
    def through_host(q, k_cache, v_cache, tables, cu, seq_lens, **kw):
        return paged(q, k_cache, v_cache, tables, cu, torch.from_numpy(seq_lens.numpy().copy()), **kw)

    monkeypatch.setattr(attention.kernels, "paged_attention", through_host)
    assert _run(llama, prompts, graphs=True, **opts)[0] == eager
    assert _run(llama, prompts, graphs=True, record=True, **opts)[0] != eager


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton's interpreter on CPU tensors")
def test_static_buffers_through_triton_interpreter(llama, monkeypatch):
    """The padded rows as the captured graph sees them on the GPU: Triton's decode kernel (in its
    interpreter here) with empty padding rows and the static table width as max_seqlen_k."""
    prompts = [(ids[:20], min(new, 6)) for ids, new in _prompts(6, seed=4)]
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    eager, _, _ = _run(llama, prompts, graphs=False, max_num_seqs=3, max_batch_tokens=64, max_model_len=256)
    got, _, graphs = _run(llama, prompts, graphs=True, max_num_seqs=3, max_batch_tokens=64, max_model_len=256)
    assert got == eager and graphs.replays > 0


def test_fits_only_decode_plans(llama):
    from hf_paged.engine.runner import StepPlan

    pipe = PagedPipeline(llama, IdTokenizer(), max_num_seqs=4)
    try:
        pipe.engine.runner.use_graphs(4, pipe.max_model_len, capture=False)
        g = pipe.engine.runner.graphs
        decode = StepPlan([5, 6], [3, 9], [3, 9], [[0], [0]], [1, 1], [4, 10], [0, 1], [])
        assert g.fits(decode)
        prefill = StepPlan([5, 6], [0, 1], [0, 1], [[0]], [2], [2], [1], [])
        assert not g.fits(prefill)
        too_many = StepPlan([5] * 5, [1] * 5, [1] * 5, [[0]] * 5, [1] * 5, [2] * 5, list(range(5)), [])
        assert not g.fits(too_many)
        with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA model"):
            pipe.engine.runner.use_graphs(4, pipe.max_model_len, capture=True)
    finally:
        pipe.close()
        hf_paged.unwrap(llama)


def assert_greedy_close(got, ref, nats: float = 0.1, most: float = 0.75) -> None:
    """Greedy runs of two numerically different paths (bf16: another GEMM row count, another attention split
    count): every sequence is the reference's, or equal up to a step where the two picks were a near-tie in
    the reference (both in its top 5, within ``nats``); and at least ``most`` of them are equal throughout."""
    same = 0
    for g, r in zip(got, ref):
        a, b = g.outputs[0], r.outputs[0]
        if a.token_ids == b.token_ids:
            same += 1
            continue
        k = next(i for i, (x, y) in enumerate(zip(a.token_ids + [None], b.token_ids + [None])) if x != y)
        top = dict(b.top_logprobs[k])
        assert a.token_ids[k] in top, (k, a.token_ids[k], b.top_logprobs[k])
        assert top[b.token_ids[k]] - top[a.token_ids[k]] <= nats, (k, a.token_ids[k], b.top_logprobs[k])
    assert same >= most * len(ref), f"{same} of {len(ref)} sequences equal"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager(tiny_root, dtype):
    model = load(build("llama", tiny_root)).to("cuda", dtype)
    prompts = _prompts(40, seed=2)
    opts = dict(max_num_seqs=32, max_batch_tokens=512, kv_memory="256MiB")
    # The reference is the plain loop (eager, no async scheduling, no overlap); graphs run with the
    # CUDA defaults (async scheduling and overlap on); eager with async on isolates the scheduling.
    plain = dict(async_scheduling=False, overlap=False)
    exact = dtype == torch.float32
    eager, _, _ = _run(model, prompts, graphs=False, top=True, **plain, **opts)
    eager_async, _, _ = _run(model, prompts, graphs=False, top=True, **opts)
    got, stats, graphs = _run(model, prompts, graphs=True, capture=True, top=True, **opts)
    assert graphs is not None and graphs.captured and graphs.replays > 0 and stats["prefix_hit_rate"] > 0
    if exact:  # fp32: token for token
        assert [r.token_ids for r in eager_async] == [r.token_ids for r in eager]
        assert [r.token_ids for r in got] == [r.token_ids for r in eager]
    else:  # bf16: the graphs pad to their bucket and split K/V by the static table width
        assert_greedy_close(eager_async, eager)
        assert_greedy_close(got, eager)
    # n > 1 (two sampled continuations per prompt, seeded): the same draws.
    sampled_eager, _, _ = _run(model, prompts[:12], graphs=False, sampling=True, **plain, **opts)
    sampled, _, _ = _run(model, prompts[:12], graphs=True, capture=True, sampling=True, **opts)
    if exact:
        assert sampled == sampled_eager
    else:
        assert sum(a == b for a, b in zip(sampled, sampled_eager)) >= 0.75 * len(sampled)
    # Every bucket size (1, 2, 4, 8, 16, 24, 32) replayed as a batch drains one sequence per step.
    drain = _draining(32, seed=9)
    drain_eager, _, _ = _run(model, drain, graphs=False, ignore_eos=True, **plain, **opts)
    drained, _, graphs = _run(model, drain, graphs=True, capture=True, ignore_eos=True, **opts)
    assert sorted(graphs.replays_by_bucket) == graphs.buckets == [1, 2, 4, 8, 16, 24, 32]
    if exact:
        assert drained == drain_eager
    else:
        assert sum(a == b for a, b in zip(drained, drain_eager)) >= 0.75 * len(drained)


def test_assert_greedy_close_accepts_near_ties_only(llama):
    """The bf16 criterion on CPU runs: equal runs pass; a pick changed where the reference was sure fails."""
    prompts = _prompts(6, seed=7)
    ref, _, _ = _run(llama, prompts, graphs=False, top=True, max_num_seqs=4)
    assert_greedy_close(ref, ref)
    out = ref[0].outputs[0]
    far = min(out.top_logprobs[0], key=lambda t: t[1])[0]  # the least likely of the top 5 at step 0
    assert out.top_logprobs[0][0][1] - dict(out.top_logprobs[0])[far] > 0.1
    out.token_ids = [far] + out.token_ids[1:]
    with pytest.raises(AssertionError):
        assert_greedy_close(ref, _run(llama, prompts, graphs=False, top=True, max_num_seqs=4)[0])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graphs_equal_eager_preemption(tiny_root):
    model = load(build("qwen3", tiny_root)).to("cuda")
    prompts = _prompts(16, seed=3)
    opts = dict(num_blocks=40, block_size=8, max_num_seqs=8, max_batch_tokens=64)
    eager, _, _ = _run(model, prompts, graphs=False, sampling=True, async_scheduling=False, overlap=False, **opts)
    got, stats, graphs = _run(model, prompts, graphs=True, capture=True, sampling=True, **opts)
    assert got == eager and stats["preemptions"] > 0 and graphs.replays > 0


def test_replaced_parameters_end_the_captured_graphs(tiny_root, caplog):
    """load_state_dict(assign=True) puts new tensors in place of the old: captured graphs would go on reading
    the old ones (freed memory, on a GPU). The next request that finds the engine idle turns them off; decode
    steps then run eagerly, on the new weights. In-place edits keep them (the graphs read that memory)."""
    import logging

    model = load(build("llama", tiny_root))
    prompt = [5, 9, 12, 7, 30, 41]
    pipe = PagedPipeline(model, IdTokenizer(), enforce_eager=True, max_num_seqs=4, num_blocks=64)
    runner = pipe.engine.runner
    runner.use_graphs(4, pipe.max_model_len, capture=True, graph_api=RecordingGraphs())
    try:
        pipe.generate(prompt, max_new_tokens=4, do_sample=False)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # in place: the graphs stay
        pipe.generate(prompt, max_new_tokens=4, do_sample=False)
        assert runner.graphs is not None and runner.graphs.replays > 0
        name = "model.layers.1.mlp.down_proj.weight"
        with caplog.at_level(logging.WARNING, logger="hf_paged"):
            model.load_state_dict({name: model.get_parameter(name) * -2.0}, strict=False, assign=True)
            got = pipe.generate(prompt, max_new_tokens=8, do_sample=False).token_ids
        assert runner.graphs is None and "decode steps run eagerly now" in caplog.text
    finally:
        pipe.close()
        hf_paged.unwrap(model)
    ref = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert got == ref[0, len(prompt):].tolist()
