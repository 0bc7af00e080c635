"""The overlapped loop (deliver step N-1 while step N runs; on by default on CUDA) gives the same
outputs as the plain loop and frees every block, with stop strings, cancels, n>1 and preemption."""
from __future__ import annotations

import random
import time

import pytest

import hf_paged
from hf_paged.engine.pipeline import PagedPipeline
from tiny_models import VOCAB, IdTokenizer, build, load


@pytest.fixture(scope="module")
def model(tiny_root):
    return load(build("llama", tiny_root))


def _requests(n: int, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 50))]
        kw: dict = dict(max_new_tokens=rng.randint(1, 30), seed=i)
        if i % 3 == 1:
            kw.update(do_sample=True, temperature=0.8, num_return_sequences=2)
        if i % 4 == 2:
            kw["logprobs"] = True
        reqs.append((ids, kw))
    return reqs


def _same(a, b) -> None:
    """Equal tokens, texts and finish reasons; logprobs equal up to float noise (a sequence stopped by a
    stop string runs one more step in the overlapped loop, which changes that step's batch shape)."""
    assert [[o[:3] for o in r] for r in a] == [[o[:3] for o in r] for r in b]
    for ra, rb in zip(a, b):
        for oa, ob in zip(ra, rb):
            assert (oa[3] is None) == (ob[3] is None)
            if oa[3] is not None:
                assert oa[3] == pytest.approx(ob[3], abs=1e-4)


def _run(model, reqs, *, overlap: bool, stop_from=None, **engine):
    pipe = PagedPipeline(model, IdTokenizer(), overlap=overlap, **engine)
    try:
        handles = []
        for i, (ids, kw) in enumerate(reqs):
            if stop_from is not None and i in stop_from:
                kw = dict(kw, stop=[stop_from[i]])
            handles.append(pipe.submit(ids, **kw))
        out = [h.result(timeout=600) for h in handles]
        stats = pipe.stats()
        return [[(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in r.outputs] for r in out], stats
    finally:
        pipe.close()
        hf_paged.unwrap(model)


def test_same_outputs_and_blocks_freed(model):
    reqs = _requests(24)
    plain, _ = _run(model, reqs, overlap=False, max_num_seqs=6, max_batch_tokens=96)
    # Stop strings taken from the plain run's texts (the 3rd generated token onwards), so they fire.
    stops = {i: " ".join(r[0][1].split()[2:4]) for i, r in enumerate(plain) if len(r[0][1].split()) > 4 and i % 2}
    assert len(stops) >= 3
    plain, _ = _run(model, reqs, overlap=False, stop_from=stops, max_num_seqs=6, max_batch_tokens=96)
    got, stats = _run(model, reqs, overlap=True, stop_from=stops, max_num_seqs=6, max_batch_tokens=96)
    _same(got, plain)
    assert sum(o[2] == "stop" or str(o[2]).endswith("STOP") for r in got for o in r) >= 3
    assert stats["blocks_used"] == 0


def test_same_outputs_under_preemption(model):
    reqs = [(ids, dict(kw, max_new_tokens=60, ignore_eos=True)) for ids, kw in _requests(12, seed=1)]
    opts = dict(num_blocks=40, block_size=8, max_num_seqs=8, max_batch_tokens=64)
    plain, _ = _run(model, reqs, overlap=False, **opts)
    got, stats = _run(model, reqs, overlap=True, **opts)
    _same(got, plain)
    assert stats["preemptions"] > 0 and stats["blocks_used"] == 0


def test_cancel_while_overlapping_frees_blocks(model):
    pipe = PagedPipeline(model, IdTokenizer(), overlap=True, max_num_seqs=4)
    try:
        long = [pipe.submit([5, 6, 7], max_new_tokens=500, ignore_eos=True) for _ in range(3)]
        short = pipe.submit([8, 9], max_new_tokens=5)
        time.sleep(0.3)
        for r in long:
            r.cancel()
        outs = [r.result(timeout=120) for r in long]
        assert all(o.outputs[0].finish_reason is not None for o in outs)
        assert len(short.result(timeout=120).token_ids) <= 5
        deadline = time.monotonic() + 10
        while pipe.stats()["blocks_used"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipe.stats()["blocks_used"] == 0
    finally:
        pipe.close()
        hf_paged.unwrap(model)
