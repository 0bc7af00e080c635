"""Constrained decoding (xgrammar): JSON schemas, regexes, grammars and choices, in the engine and
through TGI's `grammar` and OpenAI's `response_format`.

The engine here is a tiny random Llama with the default model's tokenizer: its outputs follow the
constraint only because of the constraint, so every output validating is a test of the mechanism.
"""
from __future__ import annotations

import json
import re

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
from schema_corpus import SCHEMAS  # noqa: E402
from served import serving, tiny_chat_pipeline  # noqa: E402


PROMPT = [{"role": "user", "content": "Answer in JSON."}]
BUDGET = 400  # tokens: every schema of the corpus completes well within it


@pytest.fixture(scope="module")
def pipe():
    p = tiny_chat_pipeline(max_model_len=512, kv_memory="64MiB", max_num_seqs=64)
    yield p
    p.close()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_every_schema_of_the_corpus_validates(pipe, sampled):
    kw = dict(do_sample=True, temperature=1.0, seed=7) if sampled else dict(do_sample=False)
    handles = [pipe.submit(PROMPT, max_new_tokens=BUDGET, json_schema=schema, **kw) for schema in SCHEMAS]
    for schema, handle in zip(SCHEMAS, handles):
        res = handle.result(timeout=300)
        assert res.finish_reason == "stop", (schema, res.text)
        jsonschema.validate(json.loads(res.text), schema)


def test_siblings_each_follow_the_schema(pipe):
    schema = SCHEMAS[15]
    res = pipe.generate(PROMPT, max_new_tokens=BUDGET, json_schema=schema, do_sample=True, seed=3,
                        num_return_sequences=4)
    assert len({o.text for o in res.outputs}) > 1
    for o in res.outputs:
        jsonschema.validate(json.loads(o.text), schema)


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[0-9]{4}", r"(yes|no)!", r"[a-z]{2,6}@[a-z]{3}\.(com|org)",
                                     r"\d+(\.\d{1,2})?", r"(ab|cd){1,3}x"])
def test_regex_outputs_fullmatch(pipe, pattern):
    for seed in (1, 2):
        res = pipe.generate(PROMPT, max_new_tokens=64, regex=pattern, do_sample=True, seed=seed)
        assert res.finish_reason == "stop" and re.fullmatch(pattern, res.text), res.text


def test_choices_grammar_json_object_and_pydantic(pipe):
    res = pipe.generate(PROMPT, max_new_tokens=16, choices=["red", "green", "blue \"sky\""], do_sample=True, seed=4)
    assert res.text in ("red", "green", "blue \"sky\"")
    res = pipe.generate(PROMPT, max_new_tokens=16, grammar='root ::= "A" ("B" | "C")*  "!"', do_sample=False)
    assert re.fullmatch(r"A[BC]*!", res.text) or res.finish_reason == "length"
    for seed in range(3):  # json_object (OpenAI's): an object, compact; never a top-level array or string
        res = pipe.generate(PROMPT, max_new_tokens=BUDGET, json_schema=True, do_sample=True, seed=seed)
        assert res.text.startswith("{") and (res.finish_reason == "length" or isinstance(json.loads(res.text), dict))

    from pydantic import BaseModel, Field

    class Item(BaseModel):
        name: str = Field(max_length=6)
        count: int = Field(ge=0, le=99)

    res = pipe.generate(PROMPT, max_new_tokens=BUDGET, json_schema=Item, do_sample=False)
    assert Item.model_validate_json(res.text)


def test_cut_short_is_length(pipe):
    res = pipe.generate(PROMPT, max_new_tokens=3, json_schema=SCHEMAS[12])
    assert res.finish_reason == "length" and len(res.token_ids) == 3


def test_bad_constraints_are_value_errors(pipe):
    with pytest.raises(ValueError, match="json_schema: .*objec"):
        pipe.submit(PROMPT, json_schema={"type": "objec"})
    with pytest.raises(ValueError, match="regex: .*parenthesis"):
        pipe.submit(PROMPT, regex="a(b")
    with pytest.raises(ValueError, match="at most one constraint"):
        pipe.submit(PROMPT, regex="a", choices=["a"])
    with pytest.raises(ValueError, match="choices"):
        pipe.submit(PROMPT, choices=[])
    with pytest.raises(ValueError, match="json_schema: not valid JSON"):
        pipe.submit(PROMPT, json_schema="{nope")
    # xgrammar ignores "not" (the output would not follow it), and compiles an object with thousands of
    # optional properties for minutes: both refused at once. A property called "not" is fine.
    with pytest.raises(ValueError, match="json_schema: 'not' is not supported"):
        pipe.submit(PROMPT, json_schema={"type": "object", "properties": {"a": {"not": {"type": "string"}}}})
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}}
    with pytest.raises(ValueError, match="300 optional properties; at most 256"):
        pipe.submit(PROMPT, json_schema=many)
    pipe.submit(PROMPT, json_schema=dict(many, required=list(many["properties"])), max_new_tokens=1).result(60)
    pipe.submit(PROMPT, json_schema={"type": "object", "properties": {"not": {"type": "string", "example": {"not": 1}}},
                                     "dependencies": {"not": ["not"]}}, max_new_tokens=1).result(60)


def test_schemas_too_costly_to_compile_are_refused_at_once(pipe):
    """A compile cannot be stopped and holds the server's one grammar worker: schemas that would compile for
    many seconds (nested hundreds deep, hundreds of objects with optional properties, huge enums) are refused
    before compiling. What realistic schemas use stays well inside the limits (OpenAI's: 10 levels of nesting,
    5000 properties, 1000 enum values)."""
    from hf_paged.engine import grammar

    deep = {"type": "integer"}
    for _ in range(grammar.MAX_SCHEMA_DEPTH):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ValueError, match="json_schema: nested deeper than 64 levels"):
        pipe.submit(PROMPT, json_schema=deep)
    pipe.submit(PROMPT, json_schema=deep["items"], max_new_tokens=1).result(60)  # 64 levels: fine
    objects = {"anyOf": [{"type": "object", "properties": {f"p{i}_{j}": {"type": "string"} for j in range(200)}}
                         for i in range(6)]}
    with pytest.raises(ValueError, match="more than 1024 optional properties in all"):
        pipe.submit(PROMPT, json_schema=objects)
    with pytest.raises(ValueError, match="more than 10000 enum values"):
        pipe.submit(PROMPT, json_schema={"anyOf": [{"enum": list(range(6000))}, {"enum": list(range(6000))}]})
    wide = {"anyOf": [{"const": i} for i in range(grammar.MAX_SCHEMA_NODES)]}
    with pytest.raises(ValueError, match="larger than 10000 subschemas"):
        pipe.submit(PROMPT, json_schema=wide)


@pytest.mark.parametrize("schema,mentions", [
    # xgrammar would ignore these, and the output break the schema while finishing as "stop"
    ({"allOf": [{"type": "integer"}, {"minimum": 0, "maximum": 3}]}, "'allOf' of more than one schema"),
    ({"type": "array", "contains": {"const": 7}}, "'contains' is not supported"),
    ({"type": "string", "pattern": "^(?!foo).*$"}, "Lookahead is not supported"),
    ({"type": "object", "patternProperties": {"^(?<=x)y$": {"type": "integer"}}}, "Lookbehind is not supported"),
    ({"$ref": "http://example.com/schema.json"}, "only references within the schema"),
    ({"anyOf": []}, "an empty 'anyOf' allows nothing"),
    # xgrammar's converter recursed out of the stack on this one (the process ended)
    ({"type": "string", "pattern": "(" * 30000 + "a" + ")" * 30000}, "a pattern of 60001 characters"),
    ({"type": "string", "pattern": "(" * 300 + "[(]" + ")" * 300}, "groups nested 300 deep"),
    # chained references compile in minutes; nesting through references counts as nesting
    ({"$defs": {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(300)} | {"a300": {"type": "integer"}},
      "$ref": "#/$defs/a0"}, "more than 256 '$ref's"),
    ({"$defs": {f"a{i}": {"type": "array", "items": {"type": "array", "items": {"$ref": f"#/$defs/a{i + 1}"}}}
                for i in range(40)} | {"a40": {"type": "integer"}}, "$ref": "#/$defs/a0"},
     "nested deeper than 64 levels with its references expanded"),
])
def test_schemas_xgrammar_would_ignore_or_choke_on_are_refused(pipe, schema, mentions):
    with pytest.raises(ValueError, match=re.escape(mentions)):
        pipe.submit(PROMPT, json_schema=schema)


def test_what_the_refusals_leave_alone_still_runs(pipe):
    """One-schema allOf (pydantic writes it), recursive and chained references within limits, plain patterns,
    nesting given as JSON text too deep for Python's parser refused as a ValueError."""
    tree = {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {
        "$ref": "#/$defs/node"}, "maxItems": 1}}, "required": ["kids"]}}, "$ref": "#/$defs/node"}
    chain = {"$defs": {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(20)} | {"a20": {"type": "integer"}},
             "$ref": "#/$defs/a0"}
    for schema in (tree, chain, {"allOf": [{"type": "integer", "minimum": 0, "maximum": 3}]},
                   {"type": "string", "pattern": "^[a-z]{2}[0-9]$"}):
        res = pipe.generate(PROMPT, max_new_tokens=BUDGET, json_schema=schema, do_sample=False)
        jsonschema.validate(json.loads(res.text), schema)
    with pytest.raises(ValueError, match="nested too deep"):
        pipe.submit(PROMPT, json_schema="[" * 50000 + "]" * 50000)


def test_choices_beyond_the_basic_plane(pipe):
    for seed in (1, 2):
        res = pipe.generate(PROMPT, max_new_tokens=16, choices=["😀 yes", "🙂 no"], do_sample=True, seed=seed)
        assert res.finish_reason == "stop" and res.text in ("😀 yes", "🙂 no"), res.text


def test_a_complete_output_ends_with_the_requests_own_stop_token(pipe):
    """A chat model's end-of-turn token need not be its tokenizer's EOS (xgrammar's default stop token)."""
    tok = pipe.tokenizer
    end = tok.convert_tokens_to_ids("<|im_start|>")
    assert end != tok.eos_token_id
    res = pipe.generate(PROMPT, max_new_tokens=16, choices=["red"], eos_token_id=[end], do_sample=False)
    assert res.text == "red" and res.outputs[0].token_ids[-1] == end and res.finish_reason == "stop"


# ---------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def srv(pipe):
    with serving(pipe) as s:
        yield s


def test_tgi_grammar_with_inference_client(srv):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=srv.url)
    schema = SCHEMAS[13]
    out = client.text_generation("Point:", max_new_tokens=BUDGET, grammar={"type": "json", "value": schema},
                                 return_full_text=False)
    jsonschema.validate(json.loads(out), schema)
    out = client.text_generation("Code:", max_new_tokens=32, grammar={"type": "regex", "value": "[A-Z]{3}[0-9]"},
                                 return_full_text=False)
    assert re.fullmatch("[A-Z]{3}[0-9]", out)


def test_tgis_response_format_is_a_schema_too(srv):
    """TGI's chat route takes {"type": "json" | "json_object", "value": schema} (huggingface_hub sends it); the
    schema was ignored (json_object) or refused (json)."""
    import httpx

    schema = SCHEMAS[13]
    for kind in ("json", "json_object"):
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "messages": PROMPT, "max_tokens": BUDGET, "temperature": 0,
            "response_format": {"type": kind, "value": schema}})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
    r = httpx.post(f"{srv.url}/generate", timeout=120, json={"inputs": "Point:", "parameters": {
        "max_new_tokens": BUDGET, "grammar": {"type": "json_object", "value": schema}}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["generated_text"]), schema)


def test_openai_response_format_and_parse(srv):
    openai = pytest.importorskip("openai")
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=8)
        legs: int = Field(ge=0, le=8)

    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="-")
    parsed = client.chat.completions.parse(model="tiny", messages=PROMPT, response_format=Pet, max_tokens=BUDGET,
                                           temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Pet)
    r = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=BUDGET, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "s", "schema": SCHEMAS[8], "strict": True}}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[8])


@pytest.mark.parametrize("path,body,mentions", [
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {"type": "objec"}}}},
     "objec"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a(b"}}}, "parenthesis"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": "x"}}}, "grammar.type"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": "[" * 50000 + "]" * 50000}}},
     "nested too deep"),  # JSON text too deep for Python's parser: it was a 500
    ("/v1/chat/completions", {"messages": PROMPT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objec"}}}}, "objec"),
    ("/v1/chat/completions", {"messages": PROMPT, "response_format": {"type": "yaml"}}, "response_format.type"),
])
def test_bad_grammar_is_422_and_disturbs_nothing(srv, path, body, mentions):
    import httpx

    with httpx.Client(base_url=srv.url, timeout=120) as c, c.stream(
            "POST", "/generate_stream", json={"inputs": "Count:", "parameters": {"max_new_tokens": 40}}) as running:
        r = c.post(path, json=body)
        assert r.status_code == 422 and r.json()["error_type"] == "validation" and mentions in r.json()["error"]
        frames = [line for line in running.iter_lines() if line.startswith("data:")]
    assert len(frames) == 40 and "generated_text" in json.loads(frames[-1][5:])


DEAD_END = "a[^\\x00-\\U0010FFFF]"  # compiles; after "a" no character can follow


@pytest.mark.parametrize("engine", ["plain", "async", "device_sampler"])
def test_a_constraint_that_cannot_go_on_fails_its_request_alone(engine, monkeypatch):
    """A grammar that allows no next token (here: after "a") fails closed: the request fails with a clear error
    and nothing the grammar rejects is in its output; siblings end with it, other requests go on."""
    if engine == "device_sampler":
        monkeypatch.setenv("HF_PAGED_SAMPLER", "device")
    p = tiny_chat_pipeline(max_model_len=256, kv_memory="16MiB", async_scheduling=engine == "async")
    try:
        plain = p.submit(PROMPT, max_new_tokens=20, ignore_eos=True)
        good = p.submit(PROMPT, max_new_tokens=16, regex="[0-9]{3}", do_sample=True, seed=1)
        dead = p.submit(PROMPT, max_new_tokens=16, regex=DEAD_END, do_sample=True, seed=2, num_return_sequences=2,
                        logprobs=True)
        events = list(dead)
        assert events[-1].error is not None and "no token can continue the output (1 tokens so far)" in events[-1].error
        assert events[-1].error.startswith("regex: ")
        out = events[-1].output
        assert [o.text for o in out.outputs] == ["a", "a"] and all(len(o.token_ids) == 1 for o in out.outputs)
        assert {o.finish_reason for o in out.outputs} == {"error"}
        with pytest.raises(RuntimeError, match="cannot be completed"):
            dead.result(timeout=60)
        assert re.fullmatch("[0-9]{3}", good.result(timeout=60).text)
        assert len(plain.result(timeout=60).token_ids) == 20
        assert p.stats().blocks_used == 0
    finally:
        p.close()


def test_a_token_the_matcher_rejects_fails_the_request(pipe, monkeypatch):
    """Should xgrammar's mask allow a token its matcher then rejects, that token is not recorded: the request
    fails, naming the token."""
    from hf_paged.engine import engine as engine_mod

    real = engine_mod.new_matcher

    class Rejecting:
        def __init__(self, compiled, stop_tokens=None):
            self.m, self.n = real(compiled, stop_tokens), 0

        def accept_token(self, token):
            self.n += 1
            return self.n < 3 and self.m.accept_token(token)

        def __getattr__(self, name):
            return getattr(self.m, name)

    monkeypatch.setattr(engine_mod, "new_matcher", Rejecting)
    before = pipe.stats().tokens_generated
    h = pipe.submit(PROMPT, max_new_tokens=16, regex="[a-z]{8}", do_sample=True, seed=5)
    with pytest.raises(RuntimeError, match="regex: no token that follows the constraint could be sampled: the "
                                           "grammar matcher rejected a token its mask allowed"):
        h.result(timeout=60)
    ev = list(h)[-1]
    assert len(ev.output.outputs[0].token_ids) == 2 and re.fullmatch("[a-z]+", ev.output.text)
    assert pipe.stats().tokens_generated - before == 2  # the rejected token is not counted
    monkeypatch.undo()
    assert pipe.generate(PROMPT, max_new_tokens=4, do_sample=False).token_ids  # still serving
    assert pipe.stats().blocks_used == 0


def test_a_constraint_that_must_end_before_min_new_tokens_fails_saying_so(pipe):
    h = pipe.submit(PROMPT, max_new_tokens=16, choices=["yes", "no"], min_new_tokens=6, do_sample=True, seed=1)
    with pytest.raises(RuntimeError, match=r"choices: no token that follows the constraint could be sampled: "
                                           r"min_new_tokens=6 forbids ending after \d tokens, and the "
                                           "constraint allows nothing but the end here"):
        h.result(timeout=60)
    assert list(h)[-1].output.text in ("yes", "no")
    assert pipe.stats().blocks_used == 0


def test_a_dead_end_over_http_is_a_424_and_disturbs_nothing(srv):
    import httpx

    body = {"inputs": "x", "parameters": {"max_new_tokens": 8, "grammar": {"type": "regex", "value": DEAD_END}}}
    with httpx.Client(base_url=srv.url, timeout=120) as c, c.stream(
            "POST", "/generate_stream", json={"inputs": "Count:", "parameters": {"max_new_tokens": 40}}) as running:
        r = c.post("/generate", json=body)
        assert r.status_code == 424 and "cannot be completed" in r.json()["error"]
        frames = [json.loads(line[5:]) for line in c.post("/generate_stream", json=body).iter_lines()
                  if line.startswith("data:")]
        assert "cannot be completed" in frames[-1]["error"] and "generated_text" not in frames[-1]
        done = [line for line in running.iter_lines() if line.startswith("data:")]
    assert len(done) == 40 and "generated_text" in json.loads(done[-1][5:])


def test_constraints_compose_with_preemption_stop_strings_and_prefix_cache():
    small = tiny_chat_pipeline(max_model_len=512, kv_memory=None, num_blocks=32, block_size=16, max_num_seqs=16)
    try:
        # 60 digits each: about 120 tokens per output, 12 outputs cannot all fit in 32 blocks of 16.
        long = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 60,
                "maxItems": 60}
        handles = [small.submit(PROMPT, max_new_tokens=BUDGET, json_schema=long, do_sample=True, seed=i)
                   for i in range(12)]
        for h in handles:
            res = h.result(timeout=300)
            jsonschema.validate(json.loads(res.text), long)
        stats = small.stats()
        assert stats.preemptions > 0 and stats.prefix_hit_rate > 0  # recomputed, and the prompt was shared
        cut = small.generate(PROMPT, max_new_tokens=BUDGET, json_schema=SCHEMAS[0], stop=['"'])
        assert cut.finish_reason == "stop" and cut.outputs[0].stop_string == '"' and cut.text == "{"
    finally:
        small.close()
