"""OpenAI tool calling: named and required calls are constrained to the tools' schemas; auto parses the
<tool_call> convention; the openai SDK round-trips calls, streamed and not; bad tool requests are 422."""
from __future__ import annotations

import json

import pytest

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
from served import Served, tiny_chat_pipeline, wait_idle  # noqa: E402

from hf_paged.server import create_app  # noqa: E402
from hf_paged.server.tools import AutoStream, ToolPlan, parse_output  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {"get_weather": WEATHER, "add": ADD}


@pytest.fixture(scope="module")
def srv():
    pipe = tiny_chat_pipeline(max_model_len=1024, kv_memory="64MiB")
    s = Served(create_app(pipe, model_id="tiny", ui=False, close_pipeline=False))
    s.client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="-")
    yield s
    s.stop()
    wait_idle(pipe)
    pipe.close()


def _check(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA[call.function.name])


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "add"}}, "required"])
def test_forced_calls_round_trip(srv, choice):
    # One call per answer keeps a random model's output finite (an array of calls could go on).
    r = srv.client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=choice,
                                           max_tokens=300, temperature=0, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        _check(call)
    if isinstance(choice, dict):
        assert [t.function.name for t in c.message.tool_calls] == ["add"]
    stream = srv.client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=choice,
                                                max_tokens=300, temperature=0, stream=True, parallel_tool_calls=False)
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for ch in chunk.choices:
            reasons.append(ch.finish_reason)
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert reasons[-1] == "tool_calls" and [v["name"] for v in calls.values()] == \
        [t.function.name for t in c.message.tool_calls]
    assert [json.loads(v["arguments"]) for v in calls.values()] == \
        [json.loads(t.function.arguments) for t in c.message.tool_calls]


def test_a_named_call_cut_short_is_no_call(srv):
    """max_tokens ends a named call mid-arguments: finish_reason "length" and the text as content, not a
    "tool_calls" answer whose arguments are not JSON."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = srv.client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=choice,
                                           max_tokens=3, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.tool_calls is None and c.message.content
    stream = srv.client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=choice,
                                                max_tokens=3, temperature=0, stream=True)
    chunks = [ch for chunk in stream for ch in chunk.choices]
    assert chunks[-1].finish_reason == "length" and not any(ch.delta.tool_calls for ch in chunks)
    assert "".join(ch.delta.content or "" for ch in chunks) == c.message.content


def test_auto_and_none_answer_in_text_when_the_model_does(srv):
    for choice in ("auto", "none"):
        r = srv.client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=choice,
                                               max_tokens=12, temperature=0)
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_auto_parsing_and_streaming_holdback():
    plan = ToolPlan("auto", [{"name": "add", "description": "", "parameters": ADD}])
    text = 'Sure. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    content, calls = parse_output(text, plan)
    assert content == "Sure." and calls[0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert parse_output("no call here", plan) == ("no call here", [])
    bad = 'x <tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    assert parse_output(bad, plan) == (bad, [])  # unknown function: left as text
    odd = 'x <tool_call>{"name": ["add"], "arguments": {}}</tool_call>'
    assert parse_output(odd, plan) == (odd, [])  # a name that is not a string: text too (it was a 500)
    assert parse_output("[1, 2]", ToolPlan("named", plan.functions, "add"))[1]  # any complete JSON is a call
    for mode, cut in (("named", '{"a": 1, "b'), ("required", '[{"name": "add", "arg'), ("required", '[{"x": 1}]')):
        # cut short by max_tokens or a stop string: no call, the text is the content
        assert parse_output(cut, ToolPlan(mode, plan.functions, "add")) == (cut, [])
    s = AutoStream()
    out = "".join(s.push(d) for d in ["Sure", ". <to", "ol_call>", '{"name"'])
    assert out == "Sure. " and s.calling
    s = AutoStream()
    assert "".join(s.push(d) for d in ["a <", "b"]) == "a <b"  # a lone "<" is released once it is not a tag


@pytest.mark.parametrize("body,mentions", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "unknown tool 'nope'"),
    ({"tool_choice": {"type": "function", "function": "add"}}, "`tool_choice` must be"),
    ({"tool_choice": {"type": "function", "function": 5}}, "`tool_choice` must be"),
    ({"tool_choice": {"type": "function", "function": {"name": ["add"]}}}, "`tool_choice` must be"),
    ({"response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}], "tool_choice": "required"}, "strin"),
    # a call's arguments are an object (its text was passed on as arguments that are not JSON)
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
      "tool_choice": "required"}, "must be a JSON schema of an object"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": TOOLS * 2}, "unique"),
    ({"tools": [], "tool_choice": "required"}, "needs `tools`"),
])
def test_bad_tool_requests_are_422(srv, body, mentions):
    import httpx

    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": MSGS, "tools": TOOLS, **body,
                                                            "max_tokens": 4}, timeout=60)
    assert r.status_code == 422 and mentions in r.json()["error"], r.text


def test_required_calls_take_schemas_with_defs(srv):
    """Pydantic's schemas put their subschemas in "$defs": under tool_choice "required" each function's schema
    sits inside the array's, and its "#/$defs/..." references are rewritten to point there (it was a 422)."""
    from hf_paged.server.tools import constraint, plan_tools

    loc = {"type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}}, "required": ["loc"],
           "$defs": {"Loc": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                             "required": ["city"]}}}
    tools = [{"type": "function", "function": {"name": "where", "parameters": loc}}, TOOLS[1]]
    schema = constraint(plan_tools(tools, "required", False))["json_schema"]
    assert schema["items"]["anyOf"][0]["properties"]["arguments"]["properties"]["loc"]["$ref"] == \
        "#/items/anyOf/0/properties/arguments/$defs/Loc"
    r = srv.client.chat.completions.create(model="tiny", messages=MSGS, tools=tools, tool_choice="required",
                                           max_tokens=300, temperature=0, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    for call in c.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), {"where": loc, "add": ADD}[call.function.name])


def test_auto_parsing_of_prose_tags_text_around_calls_and_unicode():
    plan = ToolPlan("auto", [{"name": "add", "description": "", "parameters": ADD},
                             {"name": "city", "description": "", "parameters": WEATHER}])
    call = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    # A tag in prose before the real call: the call is still found, the prose stays content.
    content, calls = parse_output(f"I will use a <tool_call> tag. {call}", plan)
    assert content == "I will use a <tool_call> tag." and [c["function"]["name"] for c in calls] == ["add"]
    # Arguments keep their characters (OpenAI sends UTF-8, not \u escapes).
    _, calls = parse_output('<tool_call>{"name": "city", "arguments": {"city": "Zürich", "unit": "C"}}</tool_call>',
                            plan)
    assert calls[0]["function"]["arguments"] == '{"city": "Zürich", "unit": "C"}'
    # Text after a call: streamed at the end as the unstreamed answer has it.
    assert parse_output(f"Hi {call} done", plan)[0] == "Hi  done"
    assert parse_output(f"Hi {call} done", plan, strip=False)[0] == "Hi  done"


def test_streamed_text_around_calls_equals_the_answer(srv, monkeypatch):
    """A streamed auto answer sends the text after (or between) its calls too, with the calls, as the
    unstreamed answer's content has it (the stream used to stop at the first tag)."""
    from hf_paged.server import openai_routes

    call = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    text = f"Hi {call} done"
    real = openai_routes.AutoStream

    class Scripted(real):  # the model's text replaced by the script, piece by piece
        def __init__(self):
            super().__init__()
            self._script = [text[i:i + 3] for i in range(0, len(text), 3)]

        def push(self, delta):
            return super().push(self._script.pop(0) if self._script else "")

    monkeypatch.setattr(openai_routes, "AutoStream", Scripted)
    stream = srv.client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, max_tokens=len(text),
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = [ch for chunk in stream for ch in chunk.choices]
    assert chunks[-1].finish_reason == "tool_calls"
    assert "".join(ch.delta.content or "" for ch in chunks) == "Hi  done"


def test_earlier_calls_reach_a_template_without_tools():
    """SmolLM2's template ignores tools and tool_calls: an assistant turn that called a tool is written in the
    <tool_call> convention, so the model sees what it called before the tool's answer."""
    from hf_paged.server.tools import tool_prompt

    plan = ToolPlan("auto", [{"name": "city", "description": "", "parameters": WEATHER}])
    msgs = [MSGS[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "city", "arguments": '{"city": "Zürich"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22C"}]

    class NoTools:
        chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    out, extra = tool_prompt(msgs, plan, NoTools())
    assert extra == {} and out[0]["role"] == "system"
    assert out[2] == {"role": "assistant", "content": '<tool_call>{"name": "city", "arguments": {"city": "Zürich"}}'
                      '</tool_call>'}
    assert out[3] == msgs[2]
