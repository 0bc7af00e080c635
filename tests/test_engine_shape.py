"""The engine's shape: one EngineConfig, a core that returns plain records, FinishReason told apart
end to end (engine, TGI, OpenAI), and EngineStats."""
from __future__ import annotations

import argparse

import pytest
import torch
from tiny_models import IdTokenizer, build, load

import hf_paged
from hf_paged.config import EngineConfig, add_cli_arguments, from_cli
from hf_paged.engine.engine import Engine, TokenRecord
from hf_paged.engine.outputs import FinishReason
from hf_paged.engine.params import SamplingParams
from hf_paged.engine.stats import EngineStats


# ---------------------------------------------------------------------------- EngineConfig
@pytest.mark.parametrize("kwargs,field", [
    (dict(block_size=0), "block_size"), (dict(block_size=12), "block_size"), (dict(block_size=True), "block_size"),
    (dict(kv_memory="lots"), "kv_memory"), (dict(kv_memory=-5), "kv_memory"),
    (dict(num_blocks=0), "num_blocks"), (dict(num_blocks=2.5), "num_blocks"),
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(max_batch_tokens="8"), "max_batch_tokens"),
    (dict(max_model_len=-1), "max_model_len"), (dict(enable_prefix_caching="yes"), "enable_prefix_caching"),
    (dict(kv_memory="1GiB", num_blocks=8), "num_blocks"),
    (dict(overlap="on"), "overlap"), (dict(async_scheduling=1), "async_scheduling"),
    (dict(enforce_eager="no"), "enforce_eager"),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


def test_config_unknown_option_and_overrides():
    with pytest.raises(ValueError, match="unknown argument.*frobnicate"):
        EngineConfig.from_kwargs(frobnicate=1)
    base = EngineConfig(max_num_seqs=8)
    cfg = EngineConfig.from_kwargs(base, kv_memory="64MiB")
    assert (cfg.max_num_seqs, cfg.kv_memory, base.kv_memory) == (8, "64MiB", None)


def test_both_command_lines_share_the_config_defaults():
    from hf_paged.cli import main  # noqa: F401  (the module must import)
    from hf_paged.server.__main__ import add_arguments

    direct = argparse.ArgumentParser()
    add_arguments(direct)  # python -m hf_paged.server
    parent = argparse.ArgumentParser()  # hf-paged serve: engine options on the parent, or after `serve`
    add_cli_arguments(parent)
    sub = parent.add_subparsers(dest="cmd").add_parser("serve")
    add_arguments(sub, common=False)
    assert from_cli(direct.parse_args([])) == from_cli(parent.parse_args(["serve"])) == EngineConfig()
    got = from_cli(parent.parse_args(["serve", "--kv-memory", "2GiB", "--max-num-seqs", "7", "--num-blocks", "none"]))
    assert (got.kv_memory, got.max_num_seqs, got.num_blocks) == ("2GiB", 7, None)
    assert from_cli(parent.parse_args(["--max-num-seqs", "9", "serve"])).max_num_seqs == 9


# ---------------------------------------------------------------------------- the core
@pytest.fixture(scope="module")
def tiny(tiny_root):
    model = load(build("llama", tiny_root))
    yield model
    hf_paged.unwrap(model)


def test_engine_core_returns_records_and_knows_no_tokenizer(tiny):
    hf_paged.wrap(tiny, num_blocks=64, block_size=8)
    engine = Engine(tiny, hf_paged.kv_pool(tiny), max_num_seqs=4, max_batch_tokens=64, max_model_len=512)
    assert not hasattr(engine, "tokenizer")
    params = SamplingParams(max_new_tokens=5, num_return_sequences=2, do_sample=True, seed=3)
    seqs = engine.add([1, 5, 7, 9], params)
    records: list[TokenRecord] = []
    while engine.has_work():
        records += engine.step()
    assert all(isinstance(r, TokenRecord) for r in records)
    for s in seqs:
        mine = [r for r in records if r.seq_id == s.seq_id]
        assert [r.token for r in mine] == s.output_ids and len(mine) == 5
        assert [r.finish_reason for r in mine] == [None] * 4 + [FinishReason.LENGTH]
    assert engine.stats().blocks_used == 0


def test_engine_stats_is_typed_and_counts_one_way(tiny):
    with hf_paged.PagedPipeline(tiny, IdTokenizer(), num_blocks=64, block_size=8, max_num_seqs=4) as pipe:
        pipe.generate([1] + list(range(10, 40)), max_new_tokens=3)
        s = pipe.stats()
    assert isinstance(s, EngineStats)
    assert s.blocks_used + s.blocks_cached + s.blocks_free == s.blocks_total == 64
    assert s.blocks_cached >= 3 and s.blocks_allocatable == s.blocks_cached + s.blocks_free
    assert s["blocks_cached"] == s.blocks_cached and s.as_dict()["blocks_allocatable"] == s.blocks_allocatable
    with pytest.raises(KeyError):
        s["nope"]
    snap = hf_paged.kv_pool(tiny).allocator.snapshot()
    assert (snap.used, snap.cached, snap.free) == (s.blocks_used, s.blocks_cached, s.blocks_free)
    assert snap.states.count(2) == snap.cached and len(snap.states) == snap.total


def test_finish_reason_eos_and_stop_string_in_the_engine(tiny):
    with hf_paged.PagedPipeline(tiny, IdTokenizer(), num_blocks=64, block_size=8, max_num_seqs=4) as pipe:
        free = pipe.generate([1, 5, 6, 7], max_new_tokens=12, ignore_eos=True)
        assert free.finish_reason is FinishReason.LENGTH and free.outputs[0].stop_string is None
        third = free.token_ids[2]
        stop = f" {third}"
        cut = pipe.generate([1, 5, 6, 7], max_new_tokens=12, ignore_eos=True, stop=[stop])
        assert cut.finish_reason == "stop" and cut.finish_reason is FinishReason.STOP
        assert cut.outputs[0].stop_string == stop and stop not in cut.text
        # EOS: make the first generated token the EOS id.
        eos = pipe.generate([1, 5, 6, 7], max_new_tokens=12, eos_token_id=[free.token_ids[0]])
        assert eos.finish_reason is FinishReason.STOP and eos.outputs[0].stop_string is None
        assert len(eos.token_ids) == 1
        events = list(pipe.stream([1, 5, 6, 7], max_new_tokens=12, ignore_eos=True, stop=[stop]))
        last = [e for e in events if e.token_id is not None][-1]
        assert last.finish_reason is FinishReason.STOP and last.stop_string == stop


def test_sampling_is_unchanged_by_the_split(tiny):
    """Seeded sampling with siblings gives the same tokens whatever else is in the batch."""
    with hf_paged.PagedPipeline(tiny, IdTokenizer(), num_blocks=128, block_size=8, max_num_seqs=8) as pipe:
        alone = pipe.generate([1, 9, 8, 7], max_new_tokens=6, do_sample=True, seed=11, num_return_sequences=3)
        with_others = pipe.generate([[1, 9, 8, 7], [1, 3, 3]], max_new_tokens=6, do_sample=True, seed=11,
                                    num_return_sequences=3)[0]
    assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in with_others.outputs]
    assert torch.tensor([len(o.token_ids) for o in alone.outputs]).eq(6).all()


def test_siblings_count_against_max_num_seqs(tiny):
    """num_return_sequences' siblings join the running batch when their prompt is computed: a prompt is
    admitted only if they fit under max_num_seqs (they used to push the batch past it: 16 running at 4).
    A prompt with more siblings than max_num_seqs runs alone. Seeded: the tokens of an unbounded batch."""
    def run(max_num_seqs):
        hf_paged.wrap(tiny, num_blocks=256, block_size=8)
        engine = Engine(tiny, hf_paged.kv_pool(tiny), max_num_seqs=max_num_seqs, max_batch_tokens=256,
                        max_model_len=512)
        seqs = [engine.add([1, 5 + i, 7, 9] * 3, SamplingParams(max_new_tokens=6, num_return_sequences=n,
                                                               do_sample=True, seed=i, ignore_eos=True))
                for i, n in enumerate((3, 3, 2, 3, 6))]
        peak = []
        while engine.has_work():
            engine.step()
            peak.append(len(engine.scheduler.running))
        assert engine.stats().blocks_used == 0
        hf_paged.unwrap(tiny)
        return [[s.output_ids for s in group] for group in seqs], peak

    bounded, peak = run(4)
    unbounded, _ = run(64)
    assert bounded == unbounded and all(len(o) == 6 for group in bounded for o in group)
    assert max(peak) == 6 and all(n <= 4 for n in peak[:peak.index(6)])  # the n=6 prompt alone, last


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_siblings_that_end_in_one_step_all_deliver_their_last_token(tiny, async_scheduling):
    """Siblings (n > 1) of equal length end in the same step. The request's output used to be built when the
    first of them delivered its last token, before the others had delivered theirs: their texts lacked the
    last token, and their last events were never sent. (Found by tests/engine_fuzz.py.)"""
    from hf_paged.engine.pipeline import PagedPipeline

    pipe = PagedPipeline(tiny, IdTokenizer(), num_blocks=128, block_size=8, async_scheduling=async_scheduling)
    try:
        handles = [pipe.submit([1, 5 + i, 7, 9] * 3, max_new_tokens=n_new, num_return_sequences=3, do_sample=True,
                               seed=i, ignore_eos=True) for i, n_new in enumerate((1, 4, 9))]
        for h in handles:
            events = list(h)
            out = h.result(timeout=60)
            assert [k for k, ev in enumerate(events) if ev.output is not None] == [len(events) - 1]
            for o in out.outputs:
                mine = [ev for ev in events if ev.index == o.index and ev.token_id is not None]
                assert [ev.token_id for ev in mine] == o.token_ids and len(o.token_ids) == len(out.outputs[0].token_ids)
                assert "".join(ev.text for ev in mine) == o.text == IdTokenizer().decode(o.token_ids)
                assert mine[-1].finish_reason is FinishReason.LENGTH
        assert pipe.stats()["blocks_used"] == 0
    finally:
        pipe.close()
        hf_paged.unwrap(tiny)


def test_a_cancelled_stream_ends_with_the_text_it_held_back(tiny):
    """Text held back as the possible start of a stop string is in a cancelled request's output, so its
    stream carries it too (a last event without a token), and the streamed text equals the output's."""
    from hf_paged.engine.delivery import Delivery
    from hf_paged.engine.request import Request

    hf_paged.wrap(tiny, num_blocks=64, block_size=8)
    try:
        engine = Engine(tiny, hf_paged.kv_pool(tiny), max_num_seqs=4, max_batch_tokens=256, max_model_len=512)
        delivery = Delivery(engine, IdTokenizer())
        prompt = [1, 5, 7, 9, 11]
        first = engine.add(prompt, SamplingParams(max_new_tokens=2))[0]
        while engine.has_work():
            engine.step()
        second = first.output_ids[1]
        stop = f" {second}zzz"  # never completes: " <second>" is held back as its start
        req = Request("r", prompt, prompt, SamplingParams(max_new_tokens=8, stop=[stop]), lambda r: None)
        delivery.add(req)
        for _ in range(2):
            delivery.deliver(engine.step())
        delivery.cancel(req)
        events = list(req)
        out = req.result(timeout=5)
        assert out.outputs[0].token_ids == first.output_ids and out.finish_reason == FinishReason.CANCELLED
        assert out.text == IdTokenizer().decode(first.output_ids)
        assert [ev.token_id for ev in events] == [*first.output_ids, None, None]
        assert events[-2].text == f" {second}" and events[-2].finish_reason is FinishReason.CANCELLED
        assert "".join(ev.text for ev in events) == out.text
        assert engine.stats().blocks_used == 0
    finally:
        hf_paged.unwrap(tiny)


def test_a_failed_sibling_reaches_asyncio_consumers_after_the_steps_other_tokens(tiny):
    """A record that fails a sequence (its constraint could not go on) fails its request after the events of
    the same step that came before it, for asyncio consumers too (their events are batched per step)."""
    import asyncio

    from hf_paged.engine.delivery import Delivery
    from hf_paged.engine.request import Request

    hf_paged.wrap(tiny, num_blocks=64, block_size=8)
    loop = asyncio.new_event_loop()
    try:
        engine = Engine(tiny, hf_paged.kv_pool(tiny), max_num_seqs=4, max_batch_tokens=256, max_model_len=512)
        delivery = Delivery(engine, IdTokenizer())
        req = Request("r", [1, 5, 7], [1, 5, 7], SamplingParams(max_new_tokens=8, num_return_sequences=2, do_sample=True),
                      lambda r: None)
        delivery.add(req)
        delivery.deliver(engine.step())
        q: asyncio.Queue = asyncio.Queue()
        req._async.append((loop, q))
        first, second = (st.seq for st in delivery.requests["r"])
        engine.finish(second, FinishReason.ERROR)
        delivery.deliver([TokenRecord(first.seq_id, 9), TokenRecord(second.seq_id, -1, None, None, FinishReason.ERROR,
                                                                    "regex: no token can continue")])
        loop.run_until_complete(asyncio.sleep(0.05))
        events = [q.get_nowait() for _ in range(q.qsize())]
        assert [ev.token_id for ev in events][:1] == [9] and events[-1].error == "regex: no token can continue"
        engine.finish(first, FinishReason.ERROR)
        assert engine.stats().blocks_used == 0
    finally:
        loop.close()
        hf_paged.unwrap(tiny)


def test_a_tokenizer_failing_while_delivering_fails_every_request_and_the_engine_goes_on(tiny):
    """The detokenizer raising on a token fails the step's requests (fail_all); failing a stream flushes what it
    held back, which decodes the same tokens again and raises again: that must not end the engine's thread
    (every request would then wait forever)."""
    from hf_paged.engine.pipeline import PagedPipeline

    prompt = [1, 5, 7, 9, 11]
    with PagedPipeline(tiny, IdTokenizer(), num_blocks=64, block_size=8) as pipe:
        bad = pipe.generate(prompt, max_new_tokens=3).token_ids[2]
    hf_paged.unwrap(tiny)

    class Failing(IdTokenizer):
        def decode(self, ids, **kw):
            if bad in ids:
                raise IndexError("piece id is out of range")
            return super().decode(ids, **kw)

    pipe = PagedPipeline(tiny, Failing(), num_blocks=64, block_size=8)
    try:
        handles = [pipe.submit(prompt, max_new_tokens=3, stop=["zzz"]),
                   pipe.submit([1, 8, 8, 8], max_new_tokens=40, ignore_eos=True)]
        for h in handles:
            with pytest.raises(RuntimeError, match="IndexError"):
                h.result(timeout=60)
        later = pipe.submit([1, 8, 9], max_new_tokens=1)  # still serving: it ends instead of hanging
        try:
            later.result(timeout=60)
        except RuntimeError:
            pass  # it may draw the failing token too
        assert pipe.alive and pipe.stats()["blocks_used"] == 0
    finally:
        pipe.close()
        hf_paged.unwrap(tiny)


def test_generated_tokens_count_only_recorded_ones(tiny):
    """Under async scheduling a sequence ended by a stop string has one more token in flight, which is
    dropped: the engine's tokens_generated (the Prometheus counter) counts what was delivered."""
    with hf_paged.PagedPipeline(tiny, IdTokenizer(), num_blocks=64, block_size=8, max_num_seqs=4,
                                async_scheduling=True) as pipe:
        prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 3, 4, 5, 6]]
        free = pipe.generate(prompts, max_new_tokens=12, ignore_eos=True)
        before = pipe.stats().tokens_generated
        cut = pipe.generate(prompts, max_new_tokens=12, ignore_eos=True,
                            stop=[f" {r.token_ids[3]}" for r in free][:1])
        delivered = sum(len(r.token_ids) for r in cut)
        assert any(r.finish_reason == "stop" for r in cut) and delivered < 36
        assert pipe.stats().tokens_generated - before == delivered


def test_a_request_whose_detokenizer_fails_leaves_nothing_running(tiny, monkeypatch):
    import hf_paged.engine.delivery as delivery

    with hf_paged.PagedPipeline(tiny, IdTokenizer(), num_blocks=64, block_size=8, max_num_seqs=4) as pipe:
        real = delivery.IncrementalDetokenizer

        def broken(*a, **k):
            raise ValueError("tokenizer broke")
        monkeypatch.setattr(delivery, "IncrementalDetokenizer", broken)
        with pytest.raises(RuntimeError, match="tokenizer broke"):
            pipe.generate([1, 5, 6, 7], max_new_tokens=50, ignore_eos=True, num_return_sequences=2, do_sample=True)
        assert pipe._call(lambda: (pipe.engine.has_work(), pipe.stats().blocks_used)) == (False, 0)
        monkeypatch.setattr(delivery, "IncrementalDetokenizer", real)
        assert len(pipe.generate([1, 5, 6, 7], max_new_tokens=3).token_ids) == 3


# ---------------------------------------------------------------------------- asyncio consumers
def test_async_consumers_get_every_event_in_order_with_few_wakeups(tiny):
    """Many streams on one event loop: every event arrives, in order, and a step's events wake the loop
    once (Wakeups), not once per event."""
    import asyncio

    prompts = [[3 + i, 4 + i, 5 + i] for i in range(12)]
    with hf_paged.PagedPipeline(tiny, IdTokenizer(), num_blocks=64, block_size=8, max_num_seqs=16) as pipe:
        expected = pipe.generate(prompts, max_new_tokens=6, do_sample=False)

        async def run():
            loop = asyncio.get_running_loop()
            real, calls = loop.call_soon_threadsafe, []

            def counting(cb, *args, **kw):
                calls.append(cb)
                return real(cb, *args, **kw)

            loop.call_soon_threadsafe = counting
            handles = pipe._enqueue([pipe._make_request(p, dict(max_new_tokens=6, do_sample=False)) for p in prompts])

            async def collect(h):
                return [ev async for ev in h]
            try:
                return await asyncio.gather(*(collect(h) for h in handles)), calls
            finally:
                del loop.call_soon_threadsafe

        streams, calls = asyncio.run(run())
    events = sum(len(s) for s in streams)
    for evs, want in zip(streams, expected):
        assert [e.token_id for e in evs[:-1]] == want.outputs[0].token_ids
        text = want.outputs[0].text
        assert "".join(e.text for e in evs) == text and evs[-1].output.outputs[0].text == text
    assert events == 12 * 7 and len(calls) <= 16, (events, len(calls))  # 7 steps at most, plus margin


def test_wakeups_keep_order_per_queue_and_survive_a_closed_loop():
    import asyncio

    from hf_paged.engine.request import Wakeups

    closed = asyncio.new_event_loop()
    closed.close()
    loop = asyncio.new_event_loop()
    try:
        qa, qb, qdead = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
        w = Wakeups()
        for i in range(3):
            w.add(closed, qdead, i)
            w.add(loop, qa, i)
            w.add(loop, qb, 10 + i)
        w.send()  # the closed loop's RuntimeError is swallowed; the open loop still gets its events
        w.send()  # emptied by the first send: nothing twice
        loop.run_until_complete(asyncio.sleep(0))
        assert [qa.get_nowait() for _ in range(qa.qsize())] == [0, 1, 2]
        assert [qb.get_nowait() for _ in range(qb.qsize())] == [10, 11, 12]
        assert qdead.empty()
    finally:
        loop.close()


def test_serve_freezes_the_loaded_heap_while_serving(tmp_path, monkeypatch):
    """`hf-paged serve` takes what it loaded out of the cyclic GC's view while it serves (no full
    collection over the model's and libraries' objects mid-stream), and gives it back on the way out."""
    import gc

    import uvicorn
    from served import save_tiny_chat_model

    from hf_paged.server.__main__ import add_arguments, serve

    save_tiny_chat_model(tmp_path)
    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: seen.append(
        (gc.get_freeze_count(), self.config.timeout_keep_alive)))
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    pipes = []
    real = hf_paged.PagedPipeline.from_pretrained.__func__
    monkeypatch.setattr(hf_paged.PagedPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pipes.append(real(cls, *a, **k)) or pipes[-1]))
    before = gc.get_freeze_count()
    try:
        serve(ap.parse_args(["--model", str(tmp_path), "--no-ui", "--num-blocks", "32", "--port", "0",
                             "--timeout-keep-alive", "75"]))
    finally:
        for p in pipes:
            p.close()
    assert pipes and seen and seen[0][0] > before + 1000  # the loaded objects were frozen while "serving"
    assert seen[0][1] == 75  # --timeout-keep-alive reaches uvicorn (above a load balancer's idle timeout)
    assert gc.get_freeze_count() == 0  # and unfrozen after


def test_serve_dtype_option(tmp_path, monkeypatch):
    """`--dtype` picks the weights' (and so the KV cache's) dtype: auto keeps the checkpoint's; it is
    accepted before `serve` (the top-level option) and after it; anything else is refused."""
    import uvicorn
    from served import save_tiny_chat_model

    from hf_paged.cli import main
    from hf_paged.models import cli_dtype

    save_tiny_chat_model(tmp_path)  # float32 weights
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)
    pipes = []
    real = hf_paged.PagedPipeline.from_pretrained.__func__
    monkeypatch.setattr(hf_paged.PagedPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pipes.append(real(cls, *a, **k)) or pipes[-1]))
    common = ["--no-ui", "--num-blocks", "32", "--port", "0"]
    try:
        main(["--model", str(tmp_path), "serve", *common])
        main(["--model", str(tmp_path), "serve", "--dtype", "bfloat16", *common])
        main(["--model", str(tmp_path), "--dtype", "bfloat16", "serve", *common])
        dtypes = [(p.model.dtype, p.engine.pool.k[0].dtype) for p in pipes]
    finally:
        for p in pipes:
            p.close()
    assert dtypes == [(torch.float32, torch.float32)] + [(torch.bfloat16, torch.bfloat16)] * 2
    with pytest.raises(SystemExit):
        main(["serve", "--dtype", "float8", *common])
    with pytest.raises(ValueError, match="dtype must be one of"):
        cli_dtype("int8")


def test_an_asyncio_consumer_leaves_no_events_behind(tiny):
    """Events of a handle read by an asyncio consumer are not also kept in its thread queue (a long stream
    would hold all of them until the handle is dropped); those queued before it attached reach it first."""
    import asyncio

    with hf_paged.PagedPipeline(tiny, IdTokenizer(), num_blocks=64, block_size=8, max_num_seqs=4) as pipe:
        async def run():
            h = pipe.submit([5, 6, 7], max_new_tokens=300, do_sample=False, ignore_eos=True)
            await asyncio.sleep(0.01)  # a few events may be emitted before the consumer attaches
            return h, [ev async for ev in h]

        h, events = asyncio.run(run())
        want = pipe.generate([5, 6, 7], max_new_tokens=300, do_sample=False, ignore_eos=True)
    assert [e.token_id for e in events[:-1]] == want.outputs[0].token_ids and events[-1].finished
    assert h._events.qsize() == 0


def test_a_second_consumer_of_a_handle_gets_an_error_not_a_hang(tiny):
    """A handle's events are read once, by one consumer: a second reader (a thread or an asyncio one, during
    or after the stream) would wait for ever on a queue nobody fills; it gets a RuntimeError instead, and the
    request still ends with its output."""
    import asyncio

    with hf_paged.PagedPipeline(tiny, IdTokenizer(), num_blocks=64, block_size=8, max_num_seqs=4) as pipe:
        h = pipe.submit([5, 6, 7], max_new_tokens=6, do_sample=False, ignore_eos=True)
        first = list(h)
        assert first[-1].finished
        with pytest.raises(RuntimeError, match="read"):
            list(h)

        async def read(handle):
            return [ev async for ev in handle]

        with pytest.raises(RuntimeError, match="read"):
            asyncio.run(read(h))
        assert len(h.result(timeout=60).outputs[0].token_ids) == 6

        # An asyncio consumer that read a stream, then a second one, then a thread one.
        h2 = pipe.submit([5, 6, 7], max_new_tokens=6, do_sample=False, ignore_eos=True)
        assert asyncio.run(read(h2))[-1].finished
        for again in (lambda: asyncio.run(read(h2)), lambda: list(h2)):
            with pytest.raises(RuntimeError, match="read"):
                again()
        # A thread reading while another thread reads: refused at once.
        h3 = pipe.submit([5, 6, 7], max_new_tokens=200, do_sample=False, ignore_eos=True)
        it = iter(h3)
        next(it)
        with pytest.raises(RuntimeError, match="being read"):
            next(iter(h3))
        assert list(it)[-1].finished
        # Events nobody read yet still reach a late asyncio consumer.
        h4 = pipe.submit([5, 6, 7], max_new_tokens=4, do_sample=False, ignore_eos=True)
        h4.result(timeout=60)
        assert len(asyncio.run(read(h4))) == 5


def test_cli_device_model_and_option_positions(tmp_path, monkeypatch, capsys):
    """`--device` (auto: the GPU where torch sees one) reaches every command (they all loaded on the CPU); `demo`
    loads `--model` (it ignored it); `--model`, `--dtype`, `--device` and the engine options are taken after
    `generate`/`chat`/`demo` too; a bad option is a usage error (exit 2), not a traceback."""
    from served import save_tiny_chat_model

    from hf_paged.cli import main
    from hf_paged.models import cli_device

    save_tiny_chat_model(tmp_path)
    seen = []
    real = hf_paged.PagedPipeline.from_pretrained.__func__
    monkeypatch.setattr(hf_paged.PagedPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: seen.append(k) or real(cls, *a, **k)))
    main(["generate", "--model", str(tmp_path), "--dtype", "bfloat16", "--num-blocks", "32", "Hi",
          "--max-new-tokens", "2"])
    assert seen[-1]["device"] == cli_device("auto") == "cpu" and seen[-1]["dtype"] == torch.bfloat16
    assert seen[-1]["config"].num_blocks == 32
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    main(["--model", str(tmp_path), "--num-blocks", "48", "--max-model-len", "40", "chat", "--max-new-tokens", "30"])
    assert seen[-1]["config"].num_blocks == 48
    for bad in (["--max-num-seqs", "0", "generate", "hi"], ["--device", "cuda:0", "generate", "hi"],
                ["--device", "nonsense", "generate", "hi"]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2, bad
    with pytest.raises(ValueError, match="Model path"):
        main(["demo", "--model", str(tmp_path / "missing")])


def test_cli_chat_outgrowing_the_context_keeps_going(tmp_path, monkeypatch, capsys):
    """A turn that cannot fit the context is refused with a message; the chat goes on (it ended with a traceback)."""
    import io

    from served import save_tiny_chat_model

    from hf_paged.cli import main

    save_tiny_chat_model(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n" + "a long question " * 20 + "\nhi\n\n"))
    main(["--model", str(tmp_path), "--num-blocks", "32", "--max-model-len", "64", "chat", "--max-new-tokens", "8"])
    err = capsys.readouterr().err
    assert err.count("fills the model's context") + err.count("exceeds the model's context") >= 1
