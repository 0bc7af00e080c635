"""Request shapes of the OpenAI-compatible routes (``/v1/chat/completions``, ``/v1/completions``).

Fields are OpenAI's; the subset and the treatment of unsupported ones follow TGI's ``ChatRequest`` and
``CompletionRequest`` (``router/src/lib.rs``). Fields we cannot honour (tools, response_format,
logit_bias, suffix, best_of > 1) are accepted by the schema and rejected with a 422 that names them
(:mod:`hf_paged.server.validation`), rather than silently ignored. Responses are built as plain dicts
in :mod:`hf_paged.server.openai_routes`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from .schemas import SimpleToken, Strict

# OpenAI's roles; "developer" is what newer OpenAI clients send instead of "system" (and is sent to the
# chat template as "system", which every template knows).
Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Role
    # OpenAI allows a list of typed parts; only text parts can reach a text model (other kinds are
    # refused by name in validation.chat_messages).
    content: str | list[TextPart | dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "ChatMessage":
        # OpenAI's rules: a tool result names the call it answers; only an assistant message that
        # calls tools may leave its content out.
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a `tool` message needs `tool_call_id` (the id of the call it answers)")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a `{self.role}` message needs `content` (null is allowed only for an "
                             "assistant message with `tool_calls`)")
        return self


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    # vLLM's extra sampling fields (OpenAI has none of them): clients moving from vLLM send them.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None
    user: str | None = None


class CompletionRequest(Strict):
    model: str | None = None
    # A string, a list of strings, a token id list or a list of token id lists (OpenAI's four forms).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None  # this and the three below: vLLM's extras, as on chat
    min_p: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str
    root: str | None = None  # the base model, or a LoRA adapter's folder (as vLLM lists them)
    parent: str | None = None  # a LoRA adapter's base model


class ChatTokenizeResponse(BaseModel):
    tokenize_response: list[SimpleToken]
    templated_text: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------- responses (OpenAPI only:
# the routes build plain dicts of exactly these shapes; the fuzz tests check them against the schema)
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length", "tool_calls"]
    stop_reason: str | None = None  # vLLM's field: the stop string that ended the choice, null for EOS


class _Envelope(BaseModel):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    usage: Usage


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]
    stop_reason: str | None = None


class Completion(_Envelope):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
