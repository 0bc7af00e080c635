"""Turn TGI / OpenAI request parameters into engine kwargs, with TGI's validation rules and messages.

TGI checks ranges in ``router/src/validation.rs`` (``Validation::validate``) before anything is queued;
so do we. Range errors use TGI's wording; what the engine itself rejects (``SamplingParams``) comes
back from ``pipe.submit`` as ``ValueError`` and is reported the same way.

Sampling follows TGI's server: a request samples when ``do_sample`` is set *or* any warper differs
from its neutral value (temperature != 1, top_k, top_p < 1, typical_p < 1), and a sampled request
without a seed gets a random one, returned in ``details.seed``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .errors import APIError, validation_error
from .openai_schemas import ChatMessage, ChatRequest, CompletionRequest
from ..engine.params import MIN_TEMPERATURE, REPETITION_PENALTY_RANGE
from .schemas import GenerateParameters

U64_MAX = 2**64 - 1
MAX_OPENAI_TOP_LOGPROBS = 20


@dataclass(slots=True)
class Limits:
    """Per-request bounds: the router limits TGI reports in ``/info`` (defaults are TGI's launcher
    defaults), plus hf_paged's own: ``max_n`` sequences per request (OpenAI ``n``) and the length of
    one stop string (each is matched against the output tail at every step)."""

    max_input_tokens: int
    max_total_tokens: int
    default_max_new_tokens: int
    max_stop_sequences: int = 4
    max_stop_length: int = 256
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    max_n: int = 16


def check_seed(seed: int | None, n: int = 1) -> None:
    # The engine seeds continuation i with seed + i in a torch.Generator, which takes a u64.
    if seed is not None and not 0 <= seed <= U64_MAX - (n - 1):
        raise validation_error(f"`seed` must be >= 0 and <= {U64_MAX - (n - 1)}. Given: {seed}")


def check_repetition_penalty(penalty: float | None) -> None:
    lo, hi = REPETITION_PENALTY_RANGE
    if penalty is not None and penalty <= 0:
        raise validation_error("`repetition_penalty` must be strictly positive")  # TGI's words
    if penalty is not None and not lo <= penalty <= hi:
        raise validation_error(f"`repetition_penalty` must be >= {lo:g} and <= {hi:g} (beyond that the "
                               f"scores overflow). Given: {penalty}")


def tgi_params(p: GenerateParameters, limits: Limits, *, stream: bool) -> dict[str, Any]:
    """Engine kwargs for TGI ``parameters`` (``max_new_tokens`` may be None: the server default)."""
    best_of = p.best_of if p.best_of is not None else 1
    if best_of <= 0:
        raise validation_error(f"`best_of` must be > 0 and <= 1. Given: {best_of}")
    if best_of != 1:
        raise validation_error("`best_of` != 1 is not supported when streaming tokens" if stream
                               else "`best_of` != 1 is not allowed for this endpoint")
    if stream and p.decoder_input_details:
        raise validation_error("`decoder_input_details` == true is not supported when streaming tokens")
    if p.temperature is not None and p.temperature <= 0:
        raise validation_error("`temperature` must be strictly positive")
    check_repetition_penalty(p.repetition_penalty)
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise validation_error("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise validation_error("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise validation_error("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise validation_error("`top_k` must be strictly positive")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise validation_error("`max_new_tokens` must be strictly positive")
    stop = _stop_list(p.stop, limits)
    check_seed(p.seed)
    top_n = p.top_n_tokens or 0
    if not 0 <= top_n <= limits.max_top_n_tokens:
        raise validation_error(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n}")
    if p.truncate is not None and not 0 < p.truncate <= limits.max_input_tokens:
        raise validation_error(f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
                               f"Given: {p.truncate}")
    constraint = tgi_grammar(p.grammar)
    if p.watermark:
        raise validation_error("`watermark` is not supported by hf_paged")
    temperature = 1.0 if p.temperature is None else p.temperature
    top_p = 1.0 if p.top_p is None else p.top_p
    typical_p = 1.0 if p.typical_p is None else p.typical_p
    top_k = p.top_k or 0
    sampling = bool(p.do_sample) or temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0
    if temperature < MIN_TEMPERATURE:  # the engine's rule: a vanishing temperature means greedy
        sampling = False
    seed = p.seed
    if sampling and seed is None:
        seed = random.randrange(2**63)
    return dict(max_new_tokens=p.max_new_tokens, do_sample=sampling, temperature=temperature, top_k=top_k,
                top_p=top_p, typical_p=typical_p, repetition_penalty=p.repetition_penalty or 1.0,
                frequency_penalty=p.frequency_penalty or 0.0, stop=stop, seed=seed if sampling else None,
                logprobs=True, top_logprobs=top_n, prompt_logprobs=0 if p.decoder_input_details else None,
                **constraint)


def tgi_adapter(adapter_id: str | None, adapters: list[str], model_id: str) -> dict[str, Any]:
    """TGI's ``parameters.adapter_id``: a loaded LoRA adapter's name; absent or the base model's id runs
    the base model; any other value is a 422 naming the loaded adapters."""
    if adapter_id is None or adapter_id == model_id:
        return {}
    if adapter_id not in adapters:
        loaded = ", ".join(repr(a) for a in adapters) or "none"
        raise validation_error(f"`adapter_id` {adapter_id!r} is not loaded; loaded adapters: {loaded}")
    return {"adapter": adapter_id}


def openai_adapter(model: str | None, adapters: list[str]) -> dict[str, Any]:
    """OpenAI's ``model`` picks a LoRA adapter when it names one; any other value (the base model's id,
    "tgi", ...) runs the base model, as TGI answers whatever model a client names."""
    return {"adapter": model} if model is not None and model in adapters else {}


def tgi_grammar(grammar: Any) -> dict[str, Any]:
    """TGI's ``parameters.grammar``: ``{"type": "json", "value": schema}`` (a schema object or its
    JSON text; ``json_object`` is TGI's other name for it) or ``{"type": "regex", "value": pattern}``, as
    engine kwargs."""
    if grammar is None:
        return {}
    if not isinstance(grammar, dict) or set(grammar) != {"type", "value"}:
        raise validation_error("`grammar` must be {\"type\": \"json\" | \"regex\", \"value\": ...}")
    kind, value = grammar["type"], grammar["value"]
    if kind in ("json", "json_object"):
        if not isinstance(value, (dict, str)):
            raise validation_error("`grammar.value` must be a JSON schema (an object or its JSON text)")
        return {"json_schema": value}
    if kind == "regex":
        if not isinstance(value, str):
            raise validation_error("`grammar.value` must be a regular expression string")
        return {"regex": value}
    raise validation_error(f"`grammar.type` must be \"json\" or \"regex\". Given: {kind!r}")


def _stop_list(stop: str | list[str] | None, limits: Limits) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop_sequences:
        raise validation_error(f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
                               f"Given: {len(stops)}")
    longest = max(map(len, stops), default=0)
    if longest > limits.max_stop_length:
        raise validation_error(f"`stop` sequences must be at most {limits.max_stop_length} characters. "
                               f"Given: {longest}")
    return stops


def _openai_sampling(req: ChatRequest | CompletionRequest, limits: Limits, n: int) -> dict[str, Any]:
    """OpenAI sampling fields: temperature defaults to 1 (sampling); 0 means greedy, as in TGI."""
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise validation_error("`temperature` must be >= 0.0 and <= 2.0")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise validation_error("`top_p` must be > 0.0 and <= 1.0")
    if not 1 <= n <= limits.max_n:
        raise validation_error(f"`n` must be >= 1 and <= {limits.max_n}. Given: {n}")
    if req.logit_bias:
        raise validation_error("`logit_bias` is not supported by hf_paged")
    # vLLM's extras: top_k -1 or 0 is off, min_p 0 is off.
    if req.top_k is not None and req.top_k < -1:
        raise validation_error(f"`top_k` must be -1 or 0 (off) or positive. Given: {req.top_k}")
    if req.min_p is not None and not 0.0 <= req.min_p <= 1.0:
        raise validation_error(f"`min_p` must be >= 0.0 and <= 1.0. Given: {req.min_p}")
    if req.min_tokens is not None and req.min_tokens < 0:
        raise validation_error(f"`min_tokens` must be >= 0. Given: {req.min_tokens}")
    check_repetition_penalty(req.repetition_penalty)
    check_seed(req.seed, n)
    temperature = 1.0 if req.temperature is None else req.temperature
    return dict(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                top_k=max(req.top_k or 0, 0), top_p=1.0 if req.top_p is None else req.top_p,
                min_p=req.min_p or None, repetition_penalty=req.repetition_penalty,
                min_new_tokens=req.min_tokens, ignore_eos=req.ignore_eos, seed=req.seed,
                frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                stop=_stop_list(req.stop, limits), num_return_sequences=n)


def chat_params(req: ChatRequest, limits: Limits) -> dict[str, Any]:
    constraint = response_format(req.response_format)
    top = req.top_logprobs
    if top is not None and not 0 <= top <= MAX_OPENAI_TOP_LOGPROBS:
        raise validation_error(f"`top_logprobs` must be >= 0 and <= {MAX_OPENAI_TOP_LOGPROBS}. Given: {top}")
    if top and not req.logprobs:
        raise validation_error("`top_logprobs` needs `logprobs` to be true")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and max_tokens <= 0:
        raise validation_error("`max_tokens` must be strictly positive")
    out = _openai_sampling(req, limits, 1 if req.n is None else req.n)
    out.update(max_new_tokens=max_tokens, logprobs=bool(req.logprobs), top_logprobs=top or 0, **constraint)
    return out


def response_format(fmt: Any) -> dict[str, Any]:
    """OpenAI's ``response_format``: ``text`` (the default), ``json_object`` (any JSON object) or
    ``json_schema`` with ``{"name", "schema", "strict"}``, as engine kwargs. TGI's form, ``{"type": "json" |
    "json_object", "value": schema}`` (huggingface_hub's clients send it), is a JSON schema too."""
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind in ("json", "json_object") and fmt.get("value") is not None:
        return tgi_grammar({"type": "json", "value": fmt["value"]})
    if kind == "json_object":
        return {"json_schema": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise validation_error("`response_format.json_schema.schema` must be a JSON schema object")
        return {"json_schema": schema}
    raise validation_error("`response_format.type` must be \"text\", \"json_object\" or \"json_schema\". "
                           f"Given: {kind!r}")


def completion_params(req: CompletionRequest, limits: Limits) -> dict[str, Any]:
    if req.suffix is not None:
        raise APIError(422, "Suffix is not supported and can be achieved by preprocessing the prompt.",
                       "suffix not supported")
    if req.best_of is not None and req.best_of != 1:
        raise validation_error("`best_of` != 1 is not allowed for this endpoint")
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise validation_error(f"`logprobs` must be >= 0 and <= 5. Given: {req.logprobs}")
    scoring = bool(req.echo) and req.max_tokens == 0  # prompt scoring (lm-evaluation-harness's loglikelihood)
    if req.max_tokens is not None and req.max_tokens <= 0 and not scoring:
        raise validation_error("`max_tokens` must be strictly positive (0 only with `echo`)")
    if scoring and req.stream:
        raise validation_error("`max_tokens` 0 (prompt scoring) is not supported when streaming")
    out = _openai_sampling(req, limits, 1 if req.n is None else req.n)
    # A scoring request runs one step (the prompt's logits) and returns no generated token.
    out.update(max_new_tokens=1 if scoring else req.max_tokens, logprobs=req.logprobs is not None,
               top_logprobs=req.logprobs or 0,
               prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)
    return out


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for the chat template: text parts joined; anything else (images, audio) refused.

    ``developer`` becomes ``system``; a participant's ``name``, a tool call id and an assistant's tool calls
    are passed on for templates that render them."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if isinstance(part, dict):
                    kind = part.get("type")
                    if kind == "text":  # it failed TextPart: `text` is missing or not a string
                        raise validation_error(f"`messages[{i}].content[{j}].text`: a text part needs a "
                                               "string `text`")
                    raise validation_error(f"`messages[{i}].content[{j}]`: {kind!r} parts are not supported; "
                                           "only text parts reach a text model")
                texts.append(part.text)
            content = "".join(texts)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        out.append(msg)
    return out


def completion_prompts(prompt: str | list, limits: Limits) -> list[str | list[int]]:
    """The prompt forms OpenAI allows, as a list of engine prompts."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise validation_error("Empty array detected. Do not use an empty array for the prompt.")
    if len(prompts) > limits.max_client_batch_size:
        raise APIError(422, f"Number of prompts exceeds the maximum allowed batch size of "
                            f"{limits.max_client_batch_size}", "batch size exceeded")
    return prompts
