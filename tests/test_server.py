"""The HTTP server, exercised by real clients over a real socket (uvicorn on 127.0.0.1).

Clients written by others check the wire format: huggingface_hub's InferenceClient, the
``text-generation`` package (TGI's own client), ``openai``; raw httpx checks the error contract.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import hf_paged  # noqa: E402
from hf_paged.engine.pipeline import PagedPipeline  # noqa: E402
from hf_paged.server import create_app  # noqa: E402
from served import Served, wait_idle  # noqa: E402,F401  (test_ui imports them from here too)

MODEL_ID = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "The quick brown fox", "Water boils at", "My favourite colour is", "import numpy as np\n"]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy decoding keeps counting: a long request that never hits EOS
# TGI's Info schema (docs/openapi.json): every required field, plus the nullable ones it always sends.
INFO_FIELDS = {"model_id", "model_sha", "model_pipeline_tag", "max_concurrent_requests", "max_best_of",
               "max_stop_sequences", "max_input_tokens", "max_total_tokens", "validation_workers",
               "max_client_batch_size", "router", "version", "sha", "docker_label"}


@pytest.fixture(scope="module")
def pipe():
    model, tok = hf_paged.load_default_model()
    p = PagedPipeline(model, tok, kv_memory="256MiB", max_num_seqs=64)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(pipe):
    srv = Served(create_app(pipe, model_id=MODEL_ID, ui=False, close_pipeline=False))
    srv.pipe = pipe
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def limited(pipe):
    """Same pipeline, one request at a time, behind an API key."""
    srv = Served(create_app(pipe, model_id=MODEL_ID, ui=False, close_pipeline=False, max_concurrent_requests=1,
                            api_key="secret"))
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(autouse=True)
def _idle_after(request):
    """Every test leaves the shared engine idle (conftest then checks that no block is referenced)."""
    yield
    if "pipe" in request.fixturenames:
        wait_idle(request.getfixturevalue("pipe"))


def greedy(pipe, prompt, n: int) -> str:
    return pipe.generate(prompt, max_new_tokens=n, do_sample=False).text


# ---------------------------------------------------------------------------- TGI routes
def test_info_health_models(http):
    info = http.get("/info").json()
    assert INFO_FIELDS <= info.keys()
    assert info["model_id"] == MODEL_ID and info["model_sha"] is None and info["max_best_of"] == 1
    assert info["max_input_tokens"] < info["max_total_tokens"]
    assert http.get("/health").status_code == 200
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL_ID


def test_inference_client_text_generation(server, pipe):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    prompt = PROMPTS[0]
    out = client.text_generation(prompt, max_new_tokens=8, details=True, do_sample=False)
    ref = greedy(pipe, prompt, 8)
    # POST / defaults to return_full_text for a text-generation model, as TGI does.
    assert out.generated_text == prompt + ref
    assert out.details.finish_reason == "length" and out.details.generated_tokens == 8
    assert len(out.details.tokens) == 8 and all(t.logprob <= 0 for t in out.details.tokens)
    assert "".join(t.text for t in out.details.tokens) == ref
    events = list(client.text_generation(prompt, max_new_tokens=8, details=True, stream=True, do_sample=False))
    assert "".join(e.token.text for e in events) == ref
    assert events[-1].details.finish_reason == "length" and events[-1].generated_text == prompt + ref
    assert all(e.details is None for e in events[:-1])


def test_text_generation_package_client(server, pipe):
    tg = pytest.importorskip("text_generation", reason="`text-generation` (TGI's client) is not installed")
    client = tg.Client(server.url, timeout=60)
    prompt = PROMPTS[2]
    res = client.generate(prompt, max_new_tokens=6, top_n_tokens=2, return_full_text=False)
    assert res.generated_text == greedy(pipe, prompt, 6)
    assert res.details.finish_reason == tg.types.FinishReason.Length and len(res.details.top_tokens) == 6
    streamed = list(client.generate_stream(prompt, max_new_tokens=6))
    assert "".join(r.token.text for r in streamed) == res.generated_text
    sampled = client.generate(prompt, max_new_tokens=6, do_sample=True, seed=7, return_full_text=False)
    assert sampled.details.seed == 7
    assert client.generate(prompt, max_new_tokens=6, do_sample=True, seed=7,
                           return_full_text=False).generated_text == sampled.generated_text


def test_generate_finish_reasons_and_seed(http, pipe):
    chat = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                              add_generation_prompt=True)
    r = http.post("/generate", json={"inputs": chat, "parameters": {"max_new_tokens": 64, "details": True}})
    assert r.status_code == 200 and r.json()["details"]["finish_reason"] == "eos_token"
    assert r.json()["details"]["tokens"][-1]["special"] is True
    text = r.json()["generated_text"]
    stop = text.split()[1]
    r = http.post("/generate", json={"inputs": chat, "parameters": {"max_new_tokens": 64, "details": True,
                                                                     "stop": [stop]}}).json()
    assert r["details"]["finish_reason"] == "stop_sequence" and stop not in r["generated_text"]
    # A warper turns sampling on (TGI's rule), with a fresh seed reported back.
    r = http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2, "details": True,
                                                                        "temperature": 0.5}}).json()
    assert isinstance(r["details"]["seed"], int)
    r = http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).json()
    assert r["generated_text"] and "details" not in r
    assert http.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2, "decoder_input_details": True,
                                                                 "details": True}}).json()[0]["details"]["prefill"]


def test_eos_and_stop_string_told_apart_through_both_apis(http, pipe):
    from hf_paged.engine.outputs import FinishReason

    msgs = [{"role": "user", "content": "Say hello."}]
    ref = pipe.generate(msgs, max_new_tokens=64, do_sample=False)
    assert ref.finish_reason is FinishReason.STOP and ref.outputs[0].stop_string is None  # EOS
    stop = ref.text.split()[1]
    assert pipe.generate(msgs, max_new_tokens=64, do_sample=False, stop=[stop]).outputs[0].stop_string == stop
    body = {"messages": msgs, "max_tokens": 64, "temperature": 0}
    for extra, want in [({}, None), ({"stop": [stop]}, stop)]:
        choice = http.post("/v1/chat/completions", json={**body, **extra}).json()["choices"][0]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", want)
        frames = [json.loads(line[5:]) for line in http.post("/v1/chat/completions", json={
            **body, **extra, "stream": True}).text.splitlines() if line.startswith("data:") and "[DONE]" not in line]
        last = frames[-1]["choices"][0]
        assert (last["finish_reason"], last["stop_reason"]) == ("stop", want)
        prompt = pipe.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        choice = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 64, "temperature": 0,
                                                    **extra}).json()["choices"][0]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", want)


def test_chat_tokenize(http, pipe):
    msgs = [{"role": "user", "content": "Hello there"}]
    r = http.post("/chat_tokenize", json={"messages": msgs}).json()
    assert r["templated_text"] == pipe.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert [t["id"] for t in r["tokenize_response"]] == pipe.encode(msgs)
    assert "".join(t["text"] for t in r["tokenize_response"]) == r["templated_text"]


def test_chat_tokenize_shows_the_tools_as_a_chat_completion_does(http):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    r = http.post("/chat_tokenize", json={"messages": msgs, "tools": tools}).json()
    assert "get_weather" in r["templated_text"]
    chat = http.post("/v1/chat/completions", json={"messages": msgs, "tools": tools, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == len(r["tokenize_response"])
    plain = http.post("/chat_tokenize", json={"messages": msgs, "tools": tools, "tool_choice": "none"}).json()
    assert "get_weather" not in plain["templated_text"]
    bad = http.post("/chat_tokenize", json={"messages": msgs, "tools": [{"type": "function"}]})
    assert bad.status_code == 422


def test_tokenize(http, pipe):
    toks = http.post("/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["id"] for t in toks] == pipe.tokenizer("Hello world")["input_ids"]
    assert "".join(t["text"] for t in toks) == "Hello world"


# ---------------------------------------------------------------------------- OpenAI routes
def test_openai_client(server, pipe):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ref = greedy(pipe, messages, 8)
    res = client.chat.completions.create(model="tgi", messages=messages, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=2)
    assert res.choices[0].message.content == ref and res.choices[0].finish_reason == "length"
    assert res.usage.completion_tokens == 8 and res.usage.prompt_tokens > 0
    assert len(res.choices[0].logprobs.content) == 8 and len(res.choices[0].logprobs.content[0].top_logprobs) == 2
    chunks = list(client.chat.completions.create(model="tgi", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason == "length"
    two = client.chat.completions.create(model="tgi", messages=messages, max_completion_tokens=4, n=2, seed=3,
                                         temperature=1.0)
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 8
    comp = client.completions.create(model="tgi", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert comp.choices[0].text == greedy(pipe, PROMPTS[1], 6)
    streamed = list(client.completions.create(model="tgi", prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == comp.choices[0].text


def test_openai_routes_take_vllms_sampling_extras(http, pipe):
    """top_k, min_p, repetition_penalty, min_tokens and ignore_eos (vLLM's extras, sent by clients moving from
    it) reach the engine: each request equals the engine's own with the same settings."""
    messages = [{"role": "user", "content": "Name a colour."}]
    for extra, engine in ((dict(repetition_penalty=1.3), dict(repetition_penalty=1.3)),
                          (dict(min_tokens=12, ignore_eos=True), dict(min_new_tokens=12, ignore_eos=True)),
                          (dict(top_k=1, temperature=1.0, seed=5), dict(top_k=1, do_sample=True, seed=5)),
                          (dict(min_p=1.0, temperature=1.0, seed=5), dict(min_p=1.0, do_sample=True, seed=5))):
        ref = pipe.generate(messages, max_new_tokens=16, **({"do_sample": False} | engine))
        body = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 16, "temperature": 0,
                                                        **extra}).json()
        assert body["choices"][0]["message"]["content"] == ref.text, extra
        assert body["usage"]["completion_tokens"] == len(ref.token_ids), extra
        comp = http.post("/v1/completions", json={"prompt": "Colours:", "max_tokens": 16, "temperature": 0,
                                                  **extra}).json()
        assert comp["choices"][0]["text"] == pipe.generate("Colours:", max_new_tokens=16,
                                                           **({"do_sample": False} | engine)).text, extra
    # top_k 1 and min_p 1 keep only the best token: sampling then equals greedy decoding.
    assert pipe.generate(messages, max_new_tokens=16, do_sample=True, top_k=1, seed=5).text == \
        pipe.generate(messages, max_new_tokens=16, do_sample=False).text


def test_inference_client_chat(server, pipe):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    ref = greedy(pipe, messages, 8)
    out = client.chat_completion(messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == ref
    parts = [c.choices[0].delta.content for c in client.chat_completion(messages, max_tokens=8, temperature=0,
                                                                       stream=True)]
    assert "".join(p or "" for p in parts) == ref


# ---------------------------------------------------------------------------- error contract
BAD_REQUESTS = [
    ("/generate", '{"inputs": '),  # malformed JSON
    ("/generate", "not json at all"),
    ("/generate", "[1, 2]"),
    ("/generate", {"inputs": 5}),
    ("/generate", {"parameters": {}}),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": "5"}}),
    ("/generate", {"inputs": "x", "parameters": {"do_sample": 1}}),
    ("/generate", {"inputs": "x", "parameters": {"stop": "\n"}}),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 10**9}}),
    ("/generate", {"inputs": "x", "parameters": {"temperature": 0}}),
    ("/generate", {"inputs": "x", "parameters": {"temperature": -1.0}}),
    ("/generate", {"inputs": "x", "parameters": {"top_p": 1.5}}),
    ("/generate", {"inputs": "x", "parameters": {"top_k": -3}}),
    ("/generate", {"inputs": "x", "parameters": {"typical_p": 0}}),
    ("/generate", {"inputs": "x", "parameters": {"repetition_penalty": 0}}),
    ("/generate", {"inputs": "x", "parameters": {"frequency_penalty": 3}}),
    ("/generate", {"inputs": "x", "parameters": {"seed": -1}}),
    ("/generate", {"inputs": "x", "parameters": {"seed": 2**64}}),
    ("/generate", {"inputs": "x", "parameters": {"seed": 10**30}}),
    ("/generate", {"inputs": "x", "parameters": {"top_n_tokens": 50}}),
    ("/generate", {"inputs": "x", "parameters": {"truncate": 0}}),
    ("/generate", {"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}),
    ("/generate", {"inputs": "x", "parameters": {"stop": [""]}}),
    ("/generate", {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {"type": "objec"}}}}),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a(b"}}}),
    ("/generate", {"inputs": "x", "parameters": {"watermark": True}}),
    ("/generate", {"inputs": "x", "parameters": {"adapter_id": "lora"}}),
    ("/generate", {"inputs": ""}),
    ("/generate", {"inputs": "x " * 6000}),
    ("/generate_stream", {"inputs": "x", "parameters": {"decoder_input_details": True}}),
    ("/generate_stream", {"inputs": "x", "parameters": {"top_p": 0}}),
    ("/", {"inputs": "x", "stream": "yes"}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "temperature": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 9}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_k": -2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "min_p": 1.5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "min_tokens": -1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "min_tokens": 9, "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "ignore_eos": "yes"}),
    ("/v1/completions", {"prompt": "x", "top_k": 1.5}),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d", "e"]}),
    ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": [10**9]}),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}),
    ("/v1/completions", {"prompt": "x", "best_of": 3}),
    ("/tokenize", {"inputs": None}),
]


def test_error_contract(http, pipe):
    before = pipe.stats()["tokens_generated"]
    for path, body in BAD_REQUESTS:
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        r = http.post(path, headers={"content-type": "application/json"}, **kw)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        payload = r.json()
        assert set(payload) == {"error", "error_type"}, (path, body, payload)
        assert isinstance(payload["error"], str) and payload["error"], (path, body)
        assert r.status_code == 422, (path, body, payload)
    # Nothing reached the engine: validation happens before anything is queued.
    assert pipe.stats()["tokens_generated"] == before and pipe.stats()["waiting"] == 0
    for method, path, status in [("GET", "/generate", 405), ("GET", "/no/such/route", 404)]:
        r = http.request(method, path)
        assert r.status_code == status and set(r.json()) == {"error", "error_type"}


# ---------------------------------------------------------------------------- concurrency
def _stream_text(url: str, prompt: str, n: int) -> str:
    text = []
    with httpx.Client(timeout=120) as c, c.stream("POST", f"{url}/generate_stream",
                                                  json={"inputs": prompt, "parameters": {"max_new_tokens": n}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                ev = json.loads(line[5:])
                assert "error" not in ev, ev
                text.append(ev["token"]["text"])
    return "".join(text)


def test_32_concurrent_streams_equal_serial(server, http):
    n = 10
    serial = {p: http.post("/generate", json={"inputs": p, "parameters": {"max_new_tokens": n}}).json()
              ["generated_text"] for p in PROMPTS}
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda p: _stream_text(server.url, p, n), jobs))
    assert outs == [serial[p] for p in jobs]


def test_dropped_stream_frees_blocks(server, pipe, http):
    body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 300}}
    generated = pipe.stats()["tokens_generated"]
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.url}/generate_stream", json=body) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i >= 6:
                break  # leaving the block closes the connection mid-stream
    stats = wait_idle(pipe, timeout=5)
    assert stats["blocks_used"] == 0 and stats["tokens_generated"] - generated < 250
    # A non-streaming request whose client vanishes is cancelled too (no one would read the answer).
    raw = json.dumps({"inputs": COUNTING, "parameters": {"max_new_tokens": 300}}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
        time.sleep(0.5)
    generated = pipe.stats()["tokens_generated"]
    wait_idle(pipe, timeout=5)
    assert pipe.stats()["tokens_generated"] - generated < 250
    # ... and service goes on normally.
    assert http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}).status_code == 200
    metrics = {(s.name, s.labels.get("err")): s.value for f in text_string_to_metric_families(http.get("/metrics").text)
               for s in f.samples}
    assert metrics[("tgi_request_failure_total", "cancelled")] >= 2


# ---------------------------------------------------------------------------- metrics, engine views
def _metrics(http) -> dict:
    return {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}


def test_metrics(http, pipe):
    before = _metrics(http)
    count = before["tgi_request_count"].samples[0].value
    assert http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}}).status_code == 200
    http.post("/generate", json={"inputs": "Hi", "parameters": {"top_p": 7.0}})
    fams = _metrics(http)
    assert fams["tgi_request_count"].type == "counter" and fams["tgi_request_count"].samples[0].value == count + 2
    failures = {s.labels["err"]: s.value for s in fams["tgi_request_failure"].samples}
    assert failures["validation"] >= 1
    for name in ["tgi_request_duration", "tgi_request_generated_tokens", "tgi_request_input_length",
                 "tgi_request_queue_duration", "tgi_request_mean_time_per_token_duration",
                 "tgi_request_validation_duration", "tgi_request_inference_duration"]:
        assert fams[name].type == "histogram", name
        assert {s.name: s.value for s in fams[name].samples}[f"{name}_count"] >= 1, name
    stats = wait_idle(pipe)
    fams = _metrics(http)
    value = lambda name: fams[name].samples[0].value  # noqa: E731
    assert value("tgi_batch_current_size") == 0 and value("tgi_queue_size") == 0
    for key in ["blocks_used", "blocks_free", "blocks_cached"]:
        assert value(f"hf_paged_kv_{key}") == stats[key]
    assert value("hf_paged_prefix_hit_rate") == pytest.approx(stats["prefix_hit_rate"])
    assert fams["hf_paged_preemptions"].type == "counter"
    # A CPU server decodes eagerly: the path an operator checks for a failed CUDA graph capture.
    assert [(x.labels, x.value) for x in fams["hf_paged_decode_path"].samples] == [({"path": "eager"}, 1.0)]
    assert fams["hf_paged_graph_steps"].samples[0].value == stats["graph_steps"] == 0


def test_engine_views(http, pipe):
    http.post("/generate", json={"inputs": "word " * 40, "parameters": {"max_new_tokens": 2}})
    blocks = http.get("/engine/blocks").json()
    stats = http.get("/engine/stats").json()
    assert len(blocks["states"]) == blocks["num_blocks"] == stats["blocks_total"]
    assert set(blocks["states"]) <= {0, 1, 2} and blocks["counts"]["cached"] >= 2
    assert blocks["counts"]["used"] == stats["blocks_used"] == 0


# ---------------------------------------------------------------------------- limits and auth
def test_overloaded_429(limited, pipe):
    auth = {"Authorization": "Bearer secret"}
    body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 300}}
    with httpx.Client(base_url=limited.url, headers=auth, timeout=60) as c:
        with c.stream("POST", "/generate_stream", json=body) as r:
            lines = r.iter_lines()  # keep the iterator: dropping it would close the connection
            next(lines)  # the long request holds the only permit
            over = c.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
            assert over.status_code == 429
            assert over.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
            assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                        "max_tokens": 2}).status_code == 429
        wait_idle(pipe, timeout=5)
        assert c.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_api_key_401(limited):
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    with httpx.Client(base_url=limited.url, timeout=60) as c:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}]:
            r = c.post("/generate", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
        assert c.post("/generate", json=body, headers={"Authorization": "bearer secret"}).status_code == 200
        for path in ["/health", "/info", "/metrics", "/v1/models"]:  # open, as in TGI
            assert c.get(path).status_code == 200
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{limited.url}/v1", api_key="wrong").completions.create(model="x", prompt="Hi")
    ok = openai.OpenAI(base_url=f"{limited.url}/v1", api_key="secret").completions.create(
        model="x", prompt="Hi", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_the_api_key_holds_under_a_root_path(pipe):
    """Served under a prefix (Ray Serve's route_prefix, uvicorn --root-path), the ASGI path keeps the prefix
    while the router matches without it: the key must be checked on the route the router runs, and on any
    POST at all (deny by default), not on a list of literal paths."""
    import asyncio

    app = create_app(pipe, model_id=MODEL_ID, ui=False, close_pipeline=False, api_key="secret")
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}

    async def run():
        transport = httpx.ASGITransport(app=app, root_path="/llm")
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            for path in ["/llm/generate", "/llm/v1/completions", "/llm/", "/llm/not-a-route", "/generate"]:
                r = await c.post(path, json=body)
                assert r.status_code == 401 and r.json()["error_type"] == "unauthorized", (path, r.text)
            ok = await c.post("/llm/generate", json=body, headers={"Authorization": "Bearer secret"})
            assert ok.status_code == 200 and "generated_text" in ok.json(), ok.text
            assert (await c.get("/llm/health")).status_code == 200

    asyncio.run(run())


def test_shutdown_cancels_streams(pipe):
    srv = Served(create_app(pipe, model_id=MODEL_ID, ui=False, close_pipeline=False), graceful=0.5)
    got = threading.Event()

    def reader():
        try:
            with httpx.Client(timeout=30) as c, c.stream("POST", f"{srv.url}/generate_stream",
                                                         json={"inputs": COUNTING, "parameters":
                                                               {"max_new_tokens": 400}}) as r:
                for _ in r.iter_lines():
                    got.set()
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=reader)
    t.start()
    assert got.wait(30)
    srv.stop()
    assert not srv.thread.is_alive()
    wait_idle(pipe, timeout=5)
    t.join(timeout=10)


def test_shutdown_drains_then_ends_every_request_with_a_503(pipe, caplog):
    """hf-paged serve's shutdown: a request that finishes within the drain is answered as usual; those still
    running after it end with an error that says why (a stream's last frame, a 503 without streaming), on a
    connection closed cleanly; nothing is cut off mid-body, and new requests meanwhile get 503."""
    # The drain is long enough for 8 tokens on a loaded 2-core machine, and far too short for 4000.
    srv = Served(create_app(pipe, model_id=MODEL_ID, ui=False, close_pipeline=False), drain=12.0)
    logging.getLogger("uvicorn").addHandler(caplog.handler)  # uvicorn's loggers do not propagate to the root
    long = {"max_new_tokens": 4000}
    calls = {
        "drained_stream": ("/generate_stream", {"inputs": COUNTING, "parameters": {"max_new_tokens": 8,
                                                                                  "details": True}}),
        "tgi_stream": ("/generate_stream", {"inputs": COUNTING, "parameters": long}),
        "openai_stream": ("/v1/chat/completions", {  # the schema holds it to its 4000 tokens
            "model": "x", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 4000, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                "type": "array", "items": {"type": "integer"}, "minItems": 2000}}}}),
        # Sampled (OpenAI's default temperature): ignore_eos keeps it from ending by chance within the drain.
        "completion_stream": ("/v1/completions", {"model": "x", "prompt": [COUNTING, "Hello"], "max_tokens": 4000,
                                                  "stream": True, "ignore_eos": True}),
        "tgi": ("/generate", {"inputs": COUNTING, "parameters": long}),
        "short": ("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
    }
    got: dict[str, object] = {}
    first = {name: threading.Event() for name in calls if "stream" in name}
    stopping = threading.Event()

    def call(name: str) -> None:
        path, body = calls[name]
        try:
            with httpx.Client(timeout=60) as c:
                if "stream" not in name:
                    if name == "short":  # sent while the server drains
                        stopping.wait(30)
                        while not srv.state.closing:
                            time.sleep(0.01)
                    r = c.post(f"{srv.url}{path}", json=body)
                    got[name] = (r.status_code, r.json())
                    return
                with c.stream("POST", f"{srv.url}{path}", json=body) as r:
                    lines = got[name] = []
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                            first[name].set()
        except httpx.HTTPError as exc:
            got[name] = exc

    threads = [threading.Thread(target=call, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    assert all(e.wait(30) for e in first.values())  # every stream has its first frame
    stopping.set()
    at_stop = len(got["drained_stream"])  # its frames so far
    srv.stop()
    for t in threads:
        t.join(timeout=30)
    assert not srv.thread.is_alive()
    for name in ("tgi_stream", "openai_stream", "completion_stream"):
        lines = got[name]
        assert isinstance(lines, list) and lines and lines[-1].startswith("data: {"), (name, lines[-2:])
        last = json.loads(lines[-1].removeprefix("data:"))
        message = last["error"]["message"] if name != "tgi_stream" else last["error"]
        assert message.startswith("Server is shutting down: the request was cancelled after"), (name, last)
        if name == "tgi_stream":
            assert last["error_type"] == "unhealthy"
        else:
            assert last["error"]["http_status_code"] == 503
    lines = got["drained_stream"]  # finished during the drain, as usual
    assert at_stop < 8 and len(lines) == 8, (at_stop, lines[-1])
    assert json.loads(lines[-1].removeprefix("data:"))["details"]["finish_reason"] == "length"
    status, body = got["tgi"]
    assert status == 503 and body["error_type"] == "unhealthy" and "cancelled after" in body["error"]
    # Sent once the server began to close: refused, closed, or a 503 if it got in; never a hang or an answer.
    short = got["short"]
    assert isinstance(short, (httpx.ConnectError, httpx.RemoteProtocolError)) or short[0] == 503, short
    logging.getLogger("uvicorn").removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "timeout graceful shutdown exceeded" in r.getMessage()]
    wait_idle(pipe, timeout=5)


def test_a_request_validated_after_the_drain_ended_is_refused(server):
    """Once the shutdown's drain cancelled the running requests, one that was still being validated (tokenizing,
    compiling its grammar) is refused when it would be submitted: nothing would cancel it any more."""
    state = server.app.state.hf_paged
    state.requests_cancelled = True
    try:
        r = httpx.post(f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                       timeout=30)
    finally:
        state.requests_cancelled = False
    assert r.status_code == 503 and r.json() == {"error": "Server is shutting down", "error_type": "unhealthy"}
    assert httpx.post(f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                      timeout=30).status_code == 200

    class Handle:  # a UI chat's request, submitted from a worker thread as the drain ends
        cancelled = done = False

        def cancel(self):
            self.cancelled = True

    late, early = Handle(), Handle()
    state.track(early)
    assert not early.cancelled
    state.requests_cancelled = True
    try:
        state.track(late)
    finally:
        state.requests_cancelled = False
        state.handles.discard(late)
        state.handles.discard(early)
    assert late.cancelled


def test_cli_registers_serve():
    from hf_paged.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
