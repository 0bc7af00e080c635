"""Request shapes of the OpenAI-compatible routes (``/v1/chat/completions``, ``/v1/completions``).

Fields are OpenAI's; the subset and the treatment of unsupported ones follow TGI's ``ChatRequest`` and
``CompletionRequest`` (``router/src/lib.rs``). Fields we cannot honour (tools, response_format,
logit_bias, suffix, best_of > 1) are accepted by the schema and rejected with a 422 that names them
(:mod:`hf_paged.server.validation`), rather than silently ignored. Responses are built as plain dicts
in :mod:`hf_paged.server.openai_routes`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from .schemas import Strict


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: str
    # OpenAI allows a list of typed parts; only text parts can reach a text model.
    content: str | list[TextPart | dict[str, Any]] | None = None
    name: str | None = None


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
    tools: list[Any] | None = None
    tool_choice: Any = None
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
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str
