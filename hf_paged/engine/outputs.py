"""What the engine hands back: per-sequence completions, per-request outputs and stream events."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    """Why a sequence ended. A ``str`` enum: ``FinishReason.STOP == "stop"``.

    ``STOP`` is an EOS token or a stop string; which one is in ``stop_string`` (None for EOS), as
    vLLM's ``stop_reason`` tells them apart."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    stop_string: str | None = None  # the stop string that ended it (None: EOS, or not stopped)


@dataclass(slots=True)
class RequestOutput:
    """All continuations of one prompt; ``.text``/``.token_ids``/``.finish_reason`` are the first one's."""

    request_id: str
    prompt: object
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    error: str | None = None
    # With prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it), then
    # (logprob, [(token, logprob) alternatives, best first]).
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[float] | None:
        return self.outputs[0].logprobs


@dataclass(slots=True)
class StreamEvent:
    """One new token of one continuation (``index``); the last event of a request has ``output``. A continuation
    cancelled or failed while it held text back (the start of a stop string, perhaps) ends with an event that
    has that text, its ``finish_reason`` and no token."""

    request_id: str
    index: int
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: FinishReason | None = None
    output: RequestOutput | None = None
    error: str | None = None
    stop_string: str | None = None  # with finish_reason STOP: the stop string (None: EOS)
    # On the first token event of continuation 0, when the request asked for prompt log-probabilities: as
    # RequestOutput.prompt_logprobs (a stream can show them with the prompt, before the output is done).
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.output is not None or self.error is not None
