"""The overlapped loop (deliver step N-1 while step N runs) and async scheduling (launch step N+1 before
step N's tokens are on the host; both on by default on CUDA) give the same outputs as the plain loop and
free every block, with stop strings, cancels, n>1, EOS, length limits, penalties and preemption."""
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


MODES = {"plain": dict(overlap=False, async_scheduling=False), "overlap": dict(overlap=True, async_scheduling=False),
         "async": dict(async_scheduling=True)}


def _run(model, reqs, *, mode: str, stop_from=None, fills: list | None = None, **engine):
    pipe = PagedPipeline(model, IdTokenizer(), **MODES[mode], **engine)
    if fills is not None:  # count the steps planned with tokens still in flight
        runner = pipe.engine.runner
        real = runner.execute
        runner.execute = lambda plan, prev=None: fills.append(len(plan.fill or ())) or real(plan, prev)
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


@pytest.mark.parametrize("mode", ["overlap", "async"])
def test_same_outputs_and_blocks_freed(model, mode):
    reqs = _requests(24)
    plain, _ = _run(model, reqs, mode="plain", max_num_seqs=6, max_batch_tokens=96)
    # Stop strings taken from the plain run's texts (the 3rd generated token onwards), so they fire.
    stops = {i: " ".join(r[0][1].split()[2:4]) for i, r in enumerate(plain) if len(r[0][1].split()) > 4 and i % 2}
    assert len(stops) >= 3
    plain, _ = _run(model, reqs, mode="plain", stop_from=stops, max_num_seqs=6, max_batch_tokens=96)
    fills: list[int] = []
    got, stats = _run(model, reqs, mode=mode, stop_from=stops, fills=fills, max_num_seqs=6, max_batch_tokens=96)
    _same(got, plain)
    assert sum(o[2] == "stop" or str(o[2]).endswith("STOP") for r in got for o in r) >= 3
    assert stats["blocks_used"] == 0
    # Async: most steps ran ahead (inputs taken on the device from the step in flight); overlap: none.
    assert (sum(f > 0 for f in fills) > len(fills) // 2) if mode == "async" else not any(fills)


@pytest.mark.parametrize("mode", ["overlap", "async"])
def test_same_outputs_under_preemption(model, mode):
    reqs = [(ids, dict(kw, max_new_tokens=60, ignore_eos=True)) for ids, kw in _requests(12, seed=1)]
    opts = dict(num_blocks=40, block_size=8, max_num_seqs=8, max_batch_tokens=64)
    plain, _ = _run(model, reqs, mode="plain", **opts)
    got, stats = _run(model, reqs, mode=mode, **opts)
    _same(got, plain)
    assert stats["preemptions"] > 0 and stats["blocks_used"] == 0


@pytest.mark.parametrize("mode", ["plain", "async"])
def test_samples_set_when_scheduled_holds_where_it_is_read(model, mode, monkeypatch):
    """``ScheduledSeq.samples`` is set by the scheduler; where the runner's plan and the scheduler's advance read
    it, it still says whether the chunk reaches the sequence's last token (a token in flight counts): under
    chunked prefill, preemption, siblings, stop strings, prompt logprobs and async scheduling."""
    from hf_paged.engine.runner import Runner
    from hf_paged.engine.scheduler import Scheduler

    checked = []

    def check(scheduled):
        for s in scheduled:
            assert s.samples == (s.start + s.num_tokens == len(s.seq.token_ids) + s.seq.num_ahead)
            checked.append(s.samples)

    real_plan, real_advance = Runner.plan, Scheduler.advance
    monkeypatch.setattr(Runner, "plan", lambda self, sched, every=None: check(sched.seqs)
                        or real_plan(self, sched, every))
    monkeypatch.setattr(Scheduler, "advance", lambda self, scheduled: check(scheduled)
                        or real_advance(self, scheduled))
    reqs = [(ids, dict(kw, max_new_tokens=40, **({"prompt_logprobs": 1} if i % 5 == 0 else {})))
            for i, (ids, kw) in enumerate(_requests(12, seed=2))]
    _, stats = _run(model, reqs, mode=mode, stop_from={3: "a", 7: "b"}, num_blocks=40, block_size=8, max_num_seqs=8,
                    max_batch_tokens=32)
    assert True in checked and False in checked  # prompt chunks cut by the budget were seen
    assert stats["preemptions"] > 0 and stats["blocks_used"] == 0


def test_async_with_penalties_eos_and_length_limits(model):
    """Rows whose next step's sampling needs their tokens on the host (n-gram bans) get them between that
    step's forward and its sampling, penalised rows not at all; EOS mid-run (a step too many, dropped) and
    max_new_tokens (1 included: the prompt's step samples the last token) end the others as in the plain
    loop."""
    reqs = _requests(18, seed=3)
    for i, (_, kw) in enumerate(reqs):
        if i in (2, 16):
            kw.update(repetition_penalty=1.3)
        elif i == 9:
            kw.update(no_repeat_ngram_size=2, frequency_penalty=0.5)
        kw["max_new_tokens"] = 1 if i % 6 == 4 else 40
    plain, _ = _run(model, reqs, mode="plain", max_num_seqs=5, max_batch_tokens=64)
    # EOS ids taken from the plain run's tokens (the 4th generated one), so they fire mid-run.
    eos = {i: r[0][0][3] for i, r in enumerate(plain) if i % 3 == 1 and len(r[0][0]) > 6}
    assert len(eos) >= 3
    for i, t in eos.items():
        reqs[i][1]["eos_token_id"] = t
    plain, _ = _run(model, reqs, mode="plain", max_num_seqs=5, max_batch_tokens=64)
    fills: list[int] = []
    got, stats = _run(model, reqs, mode="async", fills=fills, max_num_seqs=5, max_batch_tokens=64)
    _same(got, plain)
    assert any(fills) and 0 in fills and stats["blocks_used"] == 0
    assert all(len(o[0]) == 1 for i, r in enumerate(got) if i % 6 == 4 for o in r)
    ended = [i for i in eos if any(o[0][-1] == eos[i] and len(o[0]) < 40 for o in got[i])]
    assert len(ended) >= 3, "requests did not end on their EOS: the dropped-token path was not exercised"


@pytest.mark.parametrize("sampler", ["host", "device"])
def test_penalties_run_ahead(model, sampler, monkeypatch):
    """Repetition, frequency and presence penalties no longer hold the loop back: the sampler keeps their
    token history itself (PenaltyState) and records each token when it picks it, so a step is planned
    with the penalised rows' tokens still in flight, and the outputs stay the plain loop's."""
    import hf_paged.engine.device_sampler as device_sampler_mod
    import hf_paged.engine.sampler as sampler_mod

    monkeypatch.setenv("HF_PAGED_SAMPLER", sampler)
    reqs = _requests(10, seed=7)
    kinds = [dict(repetition_penalty=1.4), dict(frequency_penalty=0.8, presence_penalty=0.3),
             dict(repetition_penalty=0.8, presence_penalty=-0.5)]
    for i, (_, kw) in enumerate(reqs):
        kw.update(kinds[i % 3], max_new_tokens=30, ignore_eos=True)
    # The reference reads every row's token list (the state off), in the plain loop.
    with monkeypatch.context() as m:
        m.setattr(sampler_mod, "tracked", lambda row: False)
        m.setattr(device_sampler_mod, "tracked", lambda row: False)
        plain, _ = _run(model, reqs, mode="plain", max_num_seqs=6, max_batch_tokens=96)
    fills: list[int] = []
    got, stats = _run(model, reqs, mode="async", fills=fills, max_num_seqs=6, max_batch_tokens=96)
    _same(got, plain)
    assert sum(f > 0 for f in fills) > len(fills) // 2 and stats["blocks_used"] == 0
    # The penalties were applied: without them the greedy requests pick otherwise.
    bare = [(ids, {k: v for k, v in kw.items() if "penalty" not in k}) for ids, kw in reqs]
    unpenalised, _ = _run(model, bare, mode="plain", max_num_seqs=6, max_batch_tokens=96)
    assert sum(a != b for a, b in zip(plain, unpenalised)) >= 3


def test_grammar_and_ngram_rows_run_ahead():
    """Constrained rows (their mask needs the token in flight accepted by their matcher) and n-gram bans no
    longer stop async scheduling: the next step's forward is launched with their tokens in flight, the step
    in flight is recorded while it runs, then the next step samples. Outputs equal the plain loop's, and
    every constrained output still parses."""
    pytest.importorskip("xgrammar")
    import json

    from served import tiny_chat_pipeline

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer"}}, "required": ["name", "n"]}
    reqs = []
    for i in range(12):
        prompt = [{"role": "user", "content": f"Request {i}: answer briefly."}]
        kw: dict = dict(max_new_tokens=48, seed=i)
        if i % 4 == 0:
            kw.update(json_schema=schema, max_new_tokens=120)
        elif i % 4 == 1:
            kw.update(regex=r"[a-z]{3,8}( [a-z]{3,8}){2,4}\.", do_sample=True, temperature=0.9)
        elif i % 4 == 2:
            kw.update(no_repeat_ngram_size=1, ignore_eos=True, repetition_penalty=1.2)
        else:
            kw.update(ignore_eos=True)
        reqs.append((prompt, kw))

    def run(mode: str, fills: list | None = None, early: list | None = None):
        pipe = tiny_chat_pipeline(max_model_len=256, kv_memory="64MiB", max_num_seqs=6, **MODES[mode])
        eng = pipe.engine
        if fills is not None:
            real_exec, real_needs = eng.runner.execute, eng.needs_tokens
            eng.runner.execute = lambda plan, prev=None: fills.append(len(plan.fill or ())) or real_exec(plan, prev)
            eng.needs_tokens = lambda fwd: early.append(real_needs(fwd)) or early[-1]
        try:
            handles = [pipe.submit(p, **kw) for p, kw in reqs]
            out = [h.result(timeout=600) for h in handles]
            return [(r.outputs[0].token_ids, r.outputs[0].text, r.outputs[0].finish_reason) for r in out], pipe.stats()
        finally:
            pipe.close()

    plain, _ = run("plain")
    fills: list[int] = []
    early: list[bool] = []
    got, stats = run("async", fills, early)
    assert got == plain
    # The bans did ban: without them, those requests' greedy outputs repeat tokens.
    assert all(len(set(got[i][0])) == len(got[i][0]) for i in range(2, 12, 4))
    assert any(len(set(t)) < len(t) for t, _, _ in plain[3::4])
    assert stats["blocks_used"] == 0
    assert sum(f > 0 for f in fills) > len(fills) // 2  # most steps ran ahead, constrained rows in them
    assert sum(early) >= 5  # steps that recorded the one in flight between their forward and their sampling
    for i in range(0, 12, 4):
        if got[i][2] == "stop":
            json.loads(got[i][1])


@pytest.mark.parametrize("sampler", ["host", "device"])
def test_penalised_rows_that_end_while_the_step_in_flight_is_recorded(model, sampler, monkeypatch):
    """An n-gram row makes steps record the one in flight between their forward and their sampling; more than
    16 penalised requests end by EOS meanwhile (their slots of the penalty state are then reused). Their
    rows of the next step name no sequence, so no live sequence's history is swept or shared: every output
    equals the plain loop reading token lists."""
    import hf_paged.engine.device_sampler as device_sampler_mod
    import hf_paged.engine.sampler as sampler_mod

    monkeypatch.setenv("HF_PAGED_SAMPLER", sampler)
    rng = random.Random(1)
    reqs = [([rng.randrange(3, VOCAB) for _ in range(20)], dict(no_repeat_ngram_size=3, ignore_eos=True,
                                                                   max_new_tokens=200))]
    reqs += [([rng.randrange(3, VOCAB) for _ in range(rng.randint(5, 40))],
              dict(repetition_penalty=1.3, frequency_penalty=0.3, max_new_tokens=30)) for _ in range(40)]
    opts = dict(max_num_seqs=20, max_batch_tokens=64)

    def lists_plain():
        with monkeypatch.context() as m:
            m.setattr(sampler_mod, "tracked", lambda row: False)
            m.setattr(device_sampler_mod, "tracked", lambda row: False)
            return _run(model, reqs, mode="plain", **opts)[0]

    first = lists_plain()
    for i in range(1, len(reqs)):  # EOS: one of its own early tokens, so they end at varied steps
        toks = first[i][0][0]
        reqs[i][1]["eos_token_id"] = toks[rng.randint(2, min(12, len(toks) - 1))]
    plain = lists_plain()
    assert sum(r[0][2] == "stop" for r in plain) > 16
    got, stats = _run(model, reqs, mode="async", **opts)
    _same(got, plain)
    assert stats["blocks_used"] == 0


@pytest.mark.parametrize("mode", ["overlap", "async"])
def test_requests_arriving_mid_run_give_the_same_outputs(model, mode):
    """Every arrival makes the loop record and deliver what it holds first; nothing is recorded twice."""
    reqs = [(ids, dict(kw, max_new_tokens=25)) for ids, kw in _requests(12, seed=5)]
    plain, _ = _run(model, reqs, mode="plain", max_num_seqs=8)
    pipe = PagedPipeline(model, IdTokenizer(), **MODES[mode], max_num_seqs=8)
    completed: list = []  # every launched step is recorded exactly once
    real = pipe.engine.complete
    pipe.engine.complete = lambda step: completed.append(step) or real(step)
    try:
        handles = []
        for i, (ids, kw) in enumerate(reqs):
            handles.append(pipe.submit(ids, **kw))
            if i % 3 == 2:  # let the running ones get a few steps further before the next arrivals
                target, deadline = pipe.stats().steps + 3, time.monotonic() + 60
                while pipe.stats().steps < target and pipe.stats().running and time.monotonic() < deadline:
                    time.sleep(0.005)
        got = [[(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in h.result(timeout=600).outputs]
               for h in handles]
        assert pipe.stats().blocks_used == 0
    finally:
        pipe.close()
        hf_paged.unwrap(model)
    _same(got, plain)
    assert len({id(step) for step in completed}) == len(completed) > 0


@pytest.mark.parametrize("mode", ["overlap", "async"])
def test_cancel_while_overlapping_frees_blocks(model, mode):
    pipe = PagedPipeline(model, IdTokenizer(), **MODES[mode], max_num_seqs=4)
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


@pytest.mark.parametrize("mode", ["overlap", "async"])
def test_a_cancel_arriving_while_a_step_is_held_keeps_tokens_and_text_together(model, mode, monkeypatch):
    """A cancel that arrives after the loop looked at its inbox, while the stepper holds a recorded step: it
    used to be applied before that step was delivered, so the output had the step's token but not its text.
    Here every cancel arrives so (the inbox never looks non-empty to the loop, and the cancel is queued from
    inside a step)."""
    import queue

    from hf_paged.engine import pipeline as pipeline_mod

    class Blind(queue.SimpleQueue):
        def empty(self) -> bool:
            return True

    cancel_at = {}

    class Cancelling(pipeline_mod.Stepper):
        def step(self) -> None:
            super().step()
            for req, k in list(cancel_at.items()):
                streams = self.delivery.requests.get(req.request_id)
                if streams and streams[0].seq.num_generated >= k:
                    del cancel_at[req]
                    req.cancel()

    monkeypatch.setattr(pipeline_mod, "Stepper", Cancelling)
    pipe = PagedPipeline(model, IdTokenizer(), **MODES[mode], max_num_seqs=8)
    pipe._inbox = Blind()
    try:
        reqs = [pipe.submit([5, 6 + i, 7], max_new_tokens=40, ignore_eos=True) for i in range(4)]
        for k, r in enumerate(reqs):
            cancel_at[r] = 2 + 3 * k
        for r in reqs:
            events = list(r)
            out = r.result(timeout=60).outputs[0]
            assert out.finish_reason == "cancelled" and 2 <= len(out.token_ids) < 40
            assert out.text == IdTokenizer().decode(out.token_ids)
            assert [ev.token_id for ev in events if ev.token_id is not None] == out.token_ids
            assert "".join(ev.text for ev in events) == out.text
        assert pipe.generate([1, 2, 3], max_new_tokens=3).token_ids  # still serving
        assert pipe.stats()["blocks_used"] == 0
    finally:
        pipe.close()
        hf_paged.unwrap(model)


def test_a_flush_that_fails_at_close_still_ends_every_request(model, monkeypatch):
    """close() while the overlapped loop holds a step: that step is delivered after the stop is taken, and a
    failure there must not end the engine thread before it ends the running requests (they would wait forever)."""
    from hf_paged.engine import pipeline as pipeline_mod

    broken = {"on": False}

    class Failing(pipeline_mod.Stepper):
        def flush(self) -> None:
            if broken["on"] and self.holding:
                raise RuntimeError("device lost")
            super().flush()

    monkeypatch.setattr(pipeline_mod, "Stepper", Failing)
    pipe = PagedPipeline(model, IdTokenizer(), **MODES["overlap"], max_num_seqs=4)
    try:
        long = pipe.submit([5, 6, 7], max_new_tokens=500, ignore_eos=True)
        events = iter(long)
        next(events)  # running
        broken["on"] = True
    finally:
        pipe.close()
        hf_paged.unwrap(model)
    assert long._done.wait(30), "the running request was never ended"
    last = list(events)[-1]
    assert last.finished and (last.error is not None or last.output.finish_reason == "cancelled")
    assert not pipe._thread.is_alive()


@pytest.mark.parametrize("mode", ["plain", "overlap", "async"])
def test_openmp_workers_parked_after_every_step(model, mode, monkeypatch):
    """On CPU the pipeline's thread parks its OpenMP workers once each step is sampled (they would spin
    through the host work), in every loop; the outputs are those of a run that never parks."""
    import hf_paged.engine.pipeline as pipeline_mod
    from hf_paged.engine import host_runtime

    reqs = _requests(10, seed=2)
    monkeypatch.setenv("HF_PAGED_OMP_PARK", "0")
    unparked, _ = _run(model, reqs, mode="plain", max_num_seqs=4, max_batch_tokens=64)
    monkeypatch.setenv("HF_PAGED_OMP_PARK", "1")
    calls: list[bool] = []
    monkeypatch.setattr(pipeline_mod, "park_openmp_workers",
                        lambda: calls.append(host_runtime.park_openmp_workers()))
    fills: list[int] = []
    got, stats = _run(model, reqs, mode=mode, fills=fills, max_num_seqs=4, max_batch_tokens=64)
    _same(got, unparked)
    assert stats["blocks_used"] == 0
    assert len(calls) >= len(fills) > 0  # at least once per forward
    if host_runtime._gomp:  # torch links libgomp here: the pause really happened
        assert all(calls)


def test_park_openmp_workers_switch(monkeypatch):
    import torch

    from hf_paged.engine import host_runtime

    monkeypatch.setenv("HF_PAGED_OMP_PARK", "0")
    assert host_runtime.park_openmp_workers() is False
    monkeypatch.setenv("HF_PAGED_OMP_PARK", "1")
    x = torch.randn(1 << 20)
    host_runtime.park_openmp_workers()
    assert torch.equal(x + 1.0, torch.add(x, 1.0))  # the next parallel region builds its team again


@pytest.mark.parametrize("mode", ["overlap", "async"])
def test_a_failed_step_keeps_tokens_and_text_together(model, mode):
    """A step that fails while the previous step's tokens are recorded but not delivered (overlapped: the
    launch after them; async with n-gram bans: the sampling launched after recording the step in flight)
    delivers those tokens before failing the requests: each failed output's token ids are the streamed ones,
    and its text is theirs."""
    pipe = PagedPipeline(model, IdTokenizer(), **MODES[mode], max_num_seqs=8)
    engine = pipe.engine
    real, calls = engine.launch_sample, []

    def launch_sample(fwd):
        calls.append(len(fwd.sampling))
        if len(calls) == 6:
            raise RuntimeError("device lost")
        return real(fwd)

    try:
        pipe.generate([1, 2, 3], max_new_tokens=2)  # warm: the failing run starts all requests in one step
        engine.launch_sample = launch_sample
        handles = [pipe.submit([5, 6 + i, 7], max_new_tokens=40, ignore_eos=True, no_repeat_ngram_size=3)
                   for i in range(4)]
        for h in handles:
            events = list(h)
            last = events[-1]
            assert last.error is not None and "device lost" in last.error
            out = last.output.outputs[0]
            assert out.finish_reason == "error"
            assert [ev.token_id for ev in events if ev.token_id is not None] == out.token_ids
            assert "".join(ev.text for ev in events) == out.text == IdTokenizer().decode(out.token_ids)
            # Overlapped: 5 steps sampled and were recorded (the last of them delivered only after the
            # failure); async: the step in flight was recorded before the failing sampling.
            assert len(out.token_ids) == 5
        del engine.launch_sample
        assert pipe.generate([1, 2, 3], max_new_tokens=3).token_ids  # still serving
        assert pipe.stats()["blocks_used"] == 0
    finally:
        pipe.close()
        hf_paged.unwrap(model)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_failed_step_fails_its_requests_and_keeps_the_waiting_ones(model, mode):
    """A step that raises fails the requests it ran (as TGI fails a batch); a request still waiting for its
    first step then runs as if nothing happened, and the prefix cache, which the failed step may have
    published unwritten blocks to, is emptied."""
    pipe = PagedPipeline(model, IdTokenizer(), **MODES[mode], max_num_seqs=1, block_size=8)
    engine = pipe.engine
    real, calls = engine.runner.run, []

    def run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    try:
        want = pipe.generate([5, 9, 7], max_new_tokens=4, ignore_eos=True).token_ids  # 7 tokens: no full block
        pair = dict(max_new_tokens=3, ignore_eos=True, n=2, do_sample=True, seed=7)  # siblings fork from the first
        want_pair = [o.token_ids for o in pipe.submit([6, 2], **pair).result(timeout=60).outputs]
        pipe.generate(list(range(1, 30)), max_new_tokens=1)  # publishes 3 blocks
        assert pipe.stats()["blocks_cached"] == 3
        engine.runner.run = run
        first = pipe.submit([1, 2, 3], max_new_tokens=20, ignore_eos=True)
        second = pipe.submit([5, 9, 7], max_new_tokens=4, ignore_eos=True)  # waits: max_num_seqs=1
        third = pipe.submit([6, 2], **pair)  # waits too, its second sequence forking
        with pytest.raises(RuntimeError, match="device lost"):
            first.result(timeout=60)
        assert second.result(timeout=60).token_ids == want
        assert [o.token_ids for o in third.result(timeout=60).outputs] == want_pair
        assert len(calls) > 3
        stats = pipe.stats()
        assert stats["blocks_used"] == 0 and stats["blocks_cached"] == 0
        pipe.pool.allocator.check()
        assert pipe.alive
    finally:
        pipe.close()
        hf_paged.unwrap(model)


def test_a_failed_step_fails_a_sequence_preempted_with_its_token_in_flight(model):
    """Async scheduling: a sequence preempted while its token of the step in flight is not recorded yet
    waits again with that token owed; when the next step fails, its request fails with the step's error
    (kept waiting, it would later take a token of another step, or break the step after)."""
    prompts = [[1, 4 + i, 9, 2, 7, 3] for i in range(4)]
    kw = dict(async_scheduling=True, num_blocks=10, block_size=8, max_num_seqs=4)
    with PagedPipeline(model, IdTokenizer(), **kw) as pipe:
        want = [r.token_ids for r in pipe.generate(prompts, max_new_tokens=30, ignore_eos=True)]
    hf_paged.unwrap(model)
    pipe = PagedPipeline(model, IdTokenizer(), **kw)
    sched, engine = pipe.engine.scheduler, pipe.engine
    real_preempt, real_run = sched._preempt, engine.runner.run
    state = {"owed": False, "fired": False}

    def preempt(seq, out):
        real_preempt(seq, out)
        state["owed"] |= seq.num_ahead > 0

    def run(*args, **kwargs):
        if state["owed"] and not state["fired"]:
            state["fired"] = True
            raise RuntimeError("device lost")
        return real_run(*args, **kwargs)

    sched._preempt, engine.runner.run = preempt, run
    try:
        handles = [pipe.submit(p, max_new_tokens=30, ignore_eos=True) for p in prompts]
        failed = 0
        for h, w in zip(handles, want):
            try:
                out = h.result(timeout=60)
            except RuntimeError as exc:
                assert "device lost" in str(exc)
                failed += 1
            else:
                assert out.token_ids == w
        assert state["fired"] and failed
        assert pipe.generate(prompts[0], max_new_tokens=30, ignore_eos=True).token_ids == want[0]
        assert pipe.stats()["blocks_used"] == 0
        pipe.pool.allocator.check()
    finally:
        pipe.close()
        hf_paged.unwrap(model)


def test_a_failure_no_started_request_explains_fails_every_request(model):
    """A step failing before any request started (scheduling itself raising) would fail again at every step:
    the waiting requests fail with it instead of waiting forever."""
    pipe = PagedPipeline(model, IdTokenizer(), max_num_seqs=4)
    real = pipe.engine.scheduler.schedule

    def schedule(*args, **kwargs):
        raise RuntimeError("allocator broken")

    try:
        pipe.engine.scheduler.schedule = schedule
        handles = [pipe.submit([1, 2 + i, 3], max_new_tokens=4) for i in range(2)]
        for h in handles:
            with pytest.raises(RuntimeError, match="allocator broken"):
                h.result(timeout=60)
        pipe.engine.scheduler.schedule = real
        assert pipe.generate([1, 2, 3], max_new_tokens=3).token_ids
        assert pipe.stats()["blocks_used"] == 0
    finally:
        pipe.close()
        hf_paged.unwrap(model)
