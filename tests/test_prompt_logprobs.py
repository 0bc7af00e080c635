"""Prompt log-probabilities: the engine's values equal a plain HF forward's log_softmax, chunked or not,
with or without a prefix-cache hit; TGI's decoder_input_details and OpenAI's echo + logprobs return them."""
from __future__ import annotations

import math

import pytest
import torch
from served import serving, tiny_chat_pipeline


TEXT = "The capital of France is Paris, and the capital of Italy is Rome; " * 3


@pytest.fixture(scope="module")
def pipe():
    # A small token budget splits the prompt into chunks; 16-token blocks make the prompt cacheable.
    p = tiny_chat_pipeline(max_model_len=512, kv_memory="32MiB", max_batch_tokens=24)
    yield p
    p.close()


def reference(pipe, ids: list[int]) -> list[float]:
    """log p(token j | tokens < j) from one plain forward of the model (the wrapped model's own path)."""
    with torch.no_grad():
        logits = pipe.model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[j - 1, ids[j]].item() for j in range(1, len(ids))]


def test_prompt_logprobs_match_hf_forward_with_and_without_cache_hit(pipe):
    ids = pipe.encode(TEXT)
    want = reference(pipe, ids)
    for _ in range(2):  # the second run finds the whole prompt in the prefix cache
        out = pipe.generate(ids, max_new_tokens=2, prompt_logprobs=3)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        got = [e[0] for e in out.prompt_logprobs[1:]]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
        for (lp, top), tok in zip(out.prompt_logprobs[1:], ids[1:]):
            assert len(top) == 3 and top[0][1] >= top[-1][1] and all(math.isfinite(v) for _, v in top)
            assert lp <= top[0][1] + 1e-6
    assert pipe.generate(ids, max_new_tokens=2).prompt_logprobs is None
    assert pipe.stats().prefix_hit_rate > 0  # a plain request still reuses what the first two cached


def test_siblings_and_sampling_keep_prompt_logprobs(pipe):
    ids = pipe.encode("one two three four five six")
    out = pipe.generate(ids, max_new_tokens=3, do_sample=True, seed=5, num_return_sequences=3, prompt_logprobs=0)
    got = [e[0] for e in out.prompt_logprobs[1:]]
    assert max(abs(a - b) for a, b in zip(got, reference(pipe, ids))) < 1e-4
    assert all(e[1] == [] for e in out.prompt_logprobs[1:])


@pytest.fixture(scope="module")
def srv(pipe):
    with serving(pipe) as s:
        yield s


def test_tgi_decoder_input_details(srv, pipe):
    import httpx

    ids = pipe.encode(TEXT)
    want = reference(pipe, ids)
    r = httpx.post(f"{srv.url}/generate", json={"inputs": TEXT, "parameters": {
        "max_new_tokens": 2, "details": True, "decoder_input_details": True}}, timeout=60).json()
    prefill = r["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids and prefill[0]["logprob"] is None
    assert max(abs(t["logprob"] - w) for t, w in zip(prefill[1:], want)) < 1e-4


def test_openai_echo_logprobs_scores_the_prompt(srv, pipe):
    openai = pytest.importorskip("openai")
    ids = pipe.encode(TEXT)
    want = reference(pipe, ids)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="-")
    res = client.completions.create(model="tiny", prompt=TEXT, max_tokens=0, echo=True, logprobs=2)
    lp = res.choices[0].logprobs
    assert res.choices[0].text == TEXT and res.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-4
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    # With generated tokens too: the prompt's entries first, then the generated ones.
    res = client.completions.create(model="tiny", prompt=TEXT, max_tokens=3, echo=True, logprobs=1, temperature=0)
    assert len(res.choices[0].logprobs.tokens) == len(ids) + 3


@pytest.mark.parametrize("empty", [False, True], ids=["text", "empty_echo"])
def test_openai_echo_logprobs_streamed_as_without_streaming(srv, pipe, empty, monkeypatch):
    """A streamed completion with echo and logprobs sends the prompt's logprobs with the echoed text (held
    until the first token, which brings them), so the chunks add up to the response without streaming. Also
    where the prompt's tokens decode to "" (some sentencepiece tokens do; here the echo is made empty)."""
    import json

    import httpx

    if empty:
        from hf_paged.server import openai_routes

        monkeypatch.setattr(openai_routes, "_echo", lambda state, prompt: "")

    body = {"prompt": TEXT, "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0.7, "seed": 3, "n": 2}
    plain = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()
    r = httpx.post(f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60)
    got: dict = {}
    for line in r.text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            for c in json.loads(line[5:])["choices"]:
                ch = got.setdefault(c["index"], {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []})
                ch["text"] += c["text"]
                for key in ("tokens", "token_logprobs", "text_offset"):
                    ch[key] += (c["logprobs"] or {}).get(key, [])
    assert sorted(got) == [0, 1]
    for c in plain["choices"]:
        mine = got[c["index"]]
        assert mine["text"] == c["text"] and mine["tokens"] == c["logprobs"]["tokens"]
        assert mine["text_offset"] == c["logprobs"]["text_offset"]
        assert mine["token_logprobs"][0] is None and c["logprobs"]["token_logprobs"][0] is None
        assert mine["token_logprobs"][1:] == pytest.approx(c["logprobs"]["token_logprobs"][1:], abs=1e-4)
        assert len(mine["tokens"]) == len(pipe.encode(TEXT)) + 3
