"""PagedPipeline on the default model (SmolLM2-135M-Instruct): the behaviours a user relies on."""
from __future__ import annotations

import asyncio
import threading

import pytest

import hf_paged
from hf_paged.engine.pipeline import PagedPipeline
from hf_paged.engine.text_pipeline import TextGenerationPipeline

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Color of the sky?"}],
    [{"role": "user", "content": "List three prime numbers."}],
]
SYSTEM = ("You are a meticulous assistant working for a library. Always answer politely, cite the shelf "
          "number when you know it, and keep every answer under fifty words. ") * 3


@pytest.fixture(scope="module")
def default():
    return hf_paged.load_default_model()


@pytest.fixture(scope="module")
def pipe(default):
    model, tok = default
    p = PagedPipeline(model, tok, kv_memory="256MiB", max_num_seqs=32, max_batch_tokens=512)
    yield p
    p.close()
    hf_paged.unwrap(model)


def test_chat_greedy_matches_generate(default, pipe):
    model, tok = default
    results = pipe.generate(CHATS, max_new_tokens=24, do_sample=False)
    hf_paged.unwrap(model)
    try:
        for chat, res in zip(CHATS, results):
            ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            ref = model.generate(**ids, max_new_tokens=24, do_sample=False)
            assert res.token_ids == ref[0, ids["input_ids"].shape[1]:].tolist()
            assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)
    finally:
        hf_paged.wrap(model, kv_memory="256MiB")
    assert "Paris" in results[0].text


def test_shared_system_prompt_hits_prefix_cache(pipe):
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
             for q in ("Where are atlases?", "Do you lend DVDs?", "Opening hours?")]
    first = pipe.generate(chats[0], max_new_tokens=8, do_sample=False)
    hits_before = pipe.pool.allocator.prefix_hits
    rest = pipe.generate(chats, max_new_tokens=8, do_sample=False)
    assert pipe.pool.allocator.prefix_hits - hits_before >= 3 * 4  # the system prompt spans > 4 blocks
    assert rest[0].token_ids == first.token_ids  # a cache hit changes nothing


def test_seeded_sampling_is_batch_independent(pipe):
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95, seed=7)
    alone = pipe.generate(CHATS[1], **kw)
    others = [pipe.submit(c, max_new_tokens=16, do_sample=True) for c in CHATS]
    together = pipe.generate(CHATS[1], **kw)
    for o in others:
        o.result()
    assert alone.token_ids == together.token_ids


def test_stream_text_equals_final_text_and_stop_strings(pipe):
    events = list(pipe.stream(CHATS[0], max_new_tokens=24, do_sample=False))
    final = events[-1].output
    assert "".join(e.text for e in events) == final.text
    stopped = pipe.generate(CHATS[0], max_new_tokens=24, do_sample=False, stop=["France"])
    assert stopped.finish_reason == "stop" and "France" not in stopped.text
    assert final.text.startswith(stopped.text)


def test_num_return_sequences(pipe):
    res = pipe.generate(CHATS[1], max_new_tokens=12, do_sample=True, num_return_sequences=3, seed=3)
    assert len(res.outputs) == 3 and len({tuple(o.token_ids) for o in res.outputs}) > 1


def test_cancel_frees_every_block(pipe):
    handle = pipe.submit(CHATS[1], max_new_tokens=200, do_sample=False, ignore_eos=True)
    it = iter(handle)
    for _ in range(3):
        next(it)
    handle.cancel()
    out = handle.result(timeout=60)
    assert out.finish_reason == "cancelled" and 3 <= len(out.token_ids) < 200
    assert pipe.stats()["blocks_used"] == 0


def test_cancel_before_the_engine_takes_the_request(pipe):
    """A request cancelled before the engine thread picked it up still ends (it used to never finish), with
    nothing generated; n > 1 too. The engine thread is held by a call while the requests are submitted."""
    release = threading.Event()
    holder = threading.Thread(target=pipe._call, args=(release.wait,))
    holder.start()
    try:
        handles = [pipe.submit(CHATS[0], max_new_tokens=8, num_return_sequences=n, do_sample=n > 1) for n in (1, 2)]
        for h in handles:
            h.cancel()
    finally:
        release.set()
        holder.join(timeout=60)
    for h, n in zip(handles, (1, 2)):
        out = h.result(timeout=60)
        assert len(out.outputs) == n and all(o.finish_reason == "cancelled" and not o.token_ids for o in out.outputs)
    assert pipe.stats()["blocks_used"] == 0
    assert pipe.generate(CHATS[0], max_new_tokens=4).token_ids  # still serving


def test_sixteen_threads_submit_at_once(pipe):
    results: dict[int, str] = {}

    def worker(i):
        results[i] = pipe.generate([{"role": "user", "content": f"Count to {i}."}], max_new_tokens=8).text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(16))


def test_astream(pipe):
    async def run():
        return [ev async for ev in pipe.astream(CHATS[0], max_new_tokens=8, do_sample=False)]

    events = asyncio.run(run())
    assert events[-1].output is not None and "".join(e.text for e in events) == events[-1].output.text


@pytest.mark.parametrize("bad, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_new_tokens=10**6), "max_new_tokens"),
    (dict(frobnicate=1), "frobnicate"),
])
def test_invalid_input_raises_naming_the_field(pipe, bad, field):
    with pytest.raises(ValueError, match=field):
        pipe.submit(CHATS[0], **bad)
    assert pipe.stats()["waiting"] == 0


def test_empty_prompt_is_rejected(pipe):
    with pytest.raises(ValueError, match="prompt"):
        pipe.submit("")
    with pytest.raises(ValueError, match="prompt"):
        pipe.submit([])


def test_text_generation_pipeline_formats(pipe):
    gen = TextGenerationPipeline(pipe)
    out = gen("The capital of France is", max_new_tokens=4, do_sample=False)
    assert isinstance(out, list) and out[0]["generated_text"].startswith("The capital of France is")
    outs = gen(["A", "B"], max_new_tokens=2, return_full_text=False)
    assert len(outs) == 2 and isinstance(outs[0][0]["generated_text"], str)
    chat = gen(CHATS[0], max_new_tokens=8, do_sample=False)
    msgs = chat[0]["generated_text"]
    assert msgs[:-1] == CHATS[0] and msgs[-1]["role"] == "assistant"
    ids = gen("Hi", max_new_tokens=2, return_tensors=True)
    assert isinstance(ids[0]["generated_token_ids"], list)


def test_pipeline_factory_like_transformers():
    gen = hf_paged.pipeline("text-generation", model="default", dtype="float32", kv_memory="64MiB")
    try:
        out = gen([{"role": "user", "content": "Say hi."}], max_new_tokens=6, do_sample=False)
        assert out[0]["generated_text"][-1]["role"] == "assistant"
    finally:
        gen.close()
        hf_paged.unwrap(gen.model)
    with pytest.raises(ValueError, match="task"):
        hf_paged.pipeline("summarization", model="default")
    with pytest.raises(ValueError, match="unknown generation parameter"):
        hf_paged.pipeline("text-generation", model="default", frobnicate=1)


def test_engine_survives_a_request_that_fails_to_start(pipe, monkeypatch):
    from hf_paged.engine import engine as engine_mod

    real = engine_mod.Engine.add

    def broken_add(self, prompt_ids, params, *rest):
        if params.seed == 4242:
            raise RuntimeError("boom")
        return real(self, prompt_ids, params, *rest)

    monkeypatch.setattr(engine_mod.Engine, "add", broken_add)
    bad = pipe.submit(CHATS[0], max_new_tokens=4, do_sample=True, seed=4242)
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(timeout=60)
    assert pipe.alive and pipe.generate(CHATS[0], max_new_tokens=4).finish_reason in ("length", "stop")
    with pytest.raises(ValueError, match="seed"):
        pipe.submit(CHATS[0], do_sample=True, seed=2**64 - 1, num_return_sequences=2)
