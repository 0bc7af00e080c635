"""Request and response shapes of the TGI routes (``/generate``, ``/generate_stream``, ``/``, ``/info``).

Field names, defaults and nesting follow TGI's router (``router/src/lib.rs``) and its OpenAPI spec so
that TGI clients parse our answers unchanged. Requests are validated in *strict* mode: ``"5"`` is not
an integer and ``1`` is not a boolean, as with TGI's serde deserializer; ranges are checked in
:mod:`hf_paged.server.validation` so the messages can be TGI's own.

Example::

    GenerateRequest.model_validate({"inputs": "Hi", "parameters": {"max_new_tokens": 8, "details": True}})
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .encoding import lone_surrogate


class Strict(BaseModel):
    """Base of every request schema: serde-like strict types, finite floats, valid Unicode text."""

    # Unknown fields are ignored like serde does; clients send fields of newer TGI versions.
    # NaN and +-Infinity (JSON extensions, or 1e400 overflowing) are refused wherever a float is taken.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # One rule on every route: a lone surrogate is a 422 naming the field (never replaced silently).
        if lone_surrogate(value) is not None:
            raise ValueError("contains a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode text")
        return value


class GenerateParameters(Strict):
    best_of: int | None = None
    decoder_input_details: bool | None = False
    details: bool | None = False
    do_sample: bool | None = False
    frequency_penalty: float | None = None
    grammar: Any = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] | None = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool | None = False
    adapter_id: str | None = None


def _default_parameters() -> GenerateParameters:
    # TGI's `default_parameters()`: a request without a "parameters" object samples.
    return GenerateParameters(do_sample=True)


class GenerateRequest(Strict):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=_default_parameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class Details(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    """``GET /info``: TGI's ``Info`` schema; hf_paged adds nothing here (see ``/engine/stats``)."""

    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None


def dump(model: BaseModel) -> dict:
    """JSON-ready dict without the optional members TGI leaves out when empty."""
    out = model.model_dump()
    if isinstance(model, GenerateResponse) and model.details is None:
        out.pop("details")
    if isinstance(model, GenerateResponse) and model.details is not None and not model.details.top_tokens:
        out["details"].pop("top_tokens")
    if isinstance(model, StreamResponse) and not model.top_tokens:
        out.pop("top_tokens")
    return out
