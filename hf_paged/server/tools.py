"""OpenAI tool calling: the tools reach the prompt, the output becomes ``tool_calls``.

- ``tool_choice: "none"``: the tools are left out of the prompt; plain text.
- ``"required"``: the output is constrained (xgrammar) to a JSON array of ``{"name", "arguments"}``
  calls (at most ``MAX_CALLS``; one with ``parallel_tool_calls: false``), each ``arguments`` following
  its function's parameter schema.
- ``{"type": "function", "function": {"name": N}}``: constrained to N's parameter schema.
- ``"auto"`` (the default with tools): the model answers in text or calls tools in the
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` convention (Hermes, Qwen, SmolLM3);
  text outside the tags is the content.

The tools go to the chat template where it renders them (``tools=``), else into a system message that
describes them and the convention above (SmolLM2's template ignores tools).

Example::

    plan = plan_tools(req.tools, req.tool_choice)
    messages, template_kwargs = tool_prompt(messages, plan, tokenizer)
    content, calls = parse_output(text, plan)
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import validation_error

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS = 16  # calls per choice with tool_choice "required" (1 with parallel_tool_calls false)


@dataclass(slots=True)
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    functions: list[dict[str, Any]] = field(default_factory=list)  # OpenAI function objects
    name: str | None = None  # the named function
    parallel: bool = True  # several calls in one answer (OpenAI's parallel_tool_calls)

    @property
    def calls_tools(self) -> bool:
        return self.mode != "none"


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel: bool | None = None) -> ToolPlan | None:
    """Validate ``tools`` / ``tool_choice`` (422 naming what is wrong); None without tools."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise validation_error("`tool_choice` needs `tools`")
        return None
    functions = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise validation_error(f"`tools[{i}]` must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise validation_error(f"`tools[{i}].function.parameters` must be a JSON schema of an object "
                                   "(`\"type\": \"object\"`): a call's arguments are an object")
        functions.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": params})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise validation_error("`tools` names must be unique")
    parallel = parallel is not False
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan("auto", functions, parallel=parallel)
    if tool_choice in ("none", "required"):
        return ToolPlan(tool_choice, functions, parallel=parallel)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise validation_error("`tool_choice` must be \"none\", \"auto\", \"required\" or "
                               "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in names:
        raise validation_error(f"`tool_choice` names an unknown tool {name!r}; the tools are {names}")
    return ToolPlan("named", functions, name)


def constraint(plan: ToolPlan) -> dict[str, Any]:
    """Engine kwargs that force the output's shape (required / named); none for auto."""
    if plan.mode == "named":
        fn = next(f for f in plan.functions if f["name"] == plan.name)
        return {"json_schema": fn["parameters"]}
    if plan.mode == "required":
        # Each function's schema moves into the array's schema: its local references ("#/$defs/X", "#") are
        # rewritten to where it now is.
        call = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": _rebased(
                 f["parameters"], f"#/items/anyOf/{i}/properties/arguments")}, "required": ["name", "arguments"]}
                for i, f in enumerate(plan.functions)]
        return {"json_schema": {"type": "array", "minItems": 1, "maxItems": MAX_CALLS if plan.parallel else 1,
                                "items": {"anyOf": call}}}
    return {}


def _rebased(schema: Any, at: str) -> Any:
    """``schema`` with its local ``$ref``s ("#", "#/...") pointing into a copy of it placed at ``at``."""
    if isinstance(schema, list):
        return [_rebased(s, at) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = at + value[1:]
        else:
            out[key] = _rebased(value, at)
    return out


def tool_prompt(messages: list[dict], plan: ToolPlan | None, tokenizer: Any) -> tuple[list[dict], dict]:
    """Messages and chat-template kwargs that show the model its tools."""
    if plan is None or not plan.calls_tools:
        return messages, {}
    template = getattr(tokenizer, "chat_template", None) or ""
    if "tools" in template:
        return messages, {"tools": [{"type": "function", "function": f} for f in plan.functions]}
    listing = "\n".join(json.dumps({"name": f["name"], "description": f["description"],
                                    "parameters": f["parameters"]}) for f in plan.functions)
    text = ("You can call these functions:\n" + listing + "\nTo call one, answer with "
            f'{OPEN}{{"name": <function name>, "arguments": <arguments object>}}{CLOSE}.')
    messages = [_calls_as_text(m) for m in messages]  # the template would drop an assistant turn's calls
    if messages and messages[0]["role"] == "system":
        return [dict(messages[0], content=messages[0]["content"] + "\n\n" + text), *messages[1:]], {}
    return [{"role": "system", "content": text}, *messages], {}


def _calls_as_text(message: dict) -> dict:
    """An assistant message's ``tool_calls`` written into its content in the convention above."""
    calls = message.get("tool_calls") if message.get("role") == "assistant" else None
    if not calls:
        return message
    parts = []
    for c in calls:
        fn = c.get("function", {}) if isinstance(c, dict) else {}
        args = fn.get("arguments", {})
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass  # the client's own text, kept as a string
        parts.append(OPEN + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + CLOSE)
    text = message.get("content")
    text = text if isinstance(text, str) else ""
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    out["content"] = (text + "\n" if text else "") + "\n".join(parts)
    return out


def _call(name: str, arguments: Any) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def parse_output(text: str, plan: ToolPlan, strip: bool = True) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a finished output (``strip``: the content without its outer whitespace)."""
    if plan.mode == "named":
        try:
            json.loads(text)
        except ValueError:  # cut short (max_tokens, a stop string): no complete call to report
            return text, []
        return None, [_call(plan.name, text)]
    if plan.mode == "required":
        try:
            return None, [_call(c["name"], c["arguments"]) for c in json.loads(text)]
        except (ValueError, TypeError, KeyError):  # cut short: no complete call to report
            return text, []
    calls, content, rest = [], [], text
    known = {f["name"] for f in plan.functions}
    while OPEN in rest:
        before, _, after = rest.partition(OPEN)
        body, closed, tail = after.partition(CLOSE)
        inner = body.rfind(OPEN)
        if inner >= 0:  # a tag in prose before the real one: a call can only start at the last
            content.append(before + OPEN + body[:inner])
            rest = body[inner:] + closed + tail
            continue
        rest = tail
        content.append(before)
        try:
            call = json.loads(body)
            if not closed or not isinstance(call, dict) or not isinstance(call.get("name"), str) \
                    or call["name"] not in known:
                raise ValueError
            calls.append(_call(call["name"], call.get("arguments", {})))
        except ValueError:
            content.append(OPEN + body + closed)  # not a well-formed call: leave it as text
    content.append(rest)
    joined = "".join(content).strip() if strip else "".join(content)
    return (joined or None) if calls else text, calls


class AutoStream:
    """Streamed ``auto`` output: text deltas pass through until a ``<tool_call>`` tag could be
    starting; from a complete tag on, nothing more streams as content (the calls come at the end)."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0
        self.calling = False

    def push(self, delta: str) -> str:
        self.text += delta
        if self.calling:
            return ""
        at = self.text.find(OPEN, self.sent)
        if at >= 0:
            self.calling = True
            out, self.sent = self.text[self.sent:at], at
            return out
        keep = 0  # hold back a suffix that may be the start of the tag
        for k in range(min(len(OPEN) - 1, len(self.text) - self.sent), 0, -1):
            if OPEN.startswith(self.text[-k:]):
                keep = k
                break
        out = self.text[self.sent:len(self.text) - keep]
        self.sent += len(out)
        return out
