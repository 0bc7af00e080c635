"""SamplingParams: how one request wants its tokens chosen and when it wants to stop.

Defaults come from the model's ``generation_config`` the way ``model.generate()`` reads them, so a
request that sets nothing decodes exactly as ``generate()`` would; request kwargs override them.

Example::

    params = SamplingParams.from_request(model.generation_config, max_tokens=64, temperature=0.7,
                                         do_sample=True, stop="\\n\\n", seed=1)
    params.is_greedy        # False
"""
from __future__ import annotations

import copy
import logging
import math
import numbers
import re
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

logger = logging.getLogger(__name__)

# generate() settings of a generation_config that the engine does not apply, with the value that means "off":
# a model config that sets one decodes differently here than with generate() (a warning says so, once).
_NOT_APPLIED = {"num_beams": 1, "penalty_alpha": 0, "dola_layers": None, "diversity_penalty": 0,
                "suppress_tokens": None, "begin_suppress_tokens": None, "bad_words_ids": None, "sequence_bias": None,
                "forced_bos_token_id": None, "forced_eos_token_id": None, "epsilon_cutoff": 0, "eta_cutoff": 0,
                "top_h": None, "exponential_decay_length_penalty": None, "encoder_repetition_penalty": 1,
                "renormalize_logits": False, "remove_invalid_values": False}
_WARNED: dict[int, weakref.ref] = {}  # configs warned about, by id while they live (ids are reused after)

# Request spellings accepted on top of the field names (OpenAI / TGI / generate() vocabulary).
_ALIASES = {"max_tokens": "max_new_tokens", "stop_strings": "stop", "n": "num_return_sequences"}

# generate() falls back to max_length=20 *total* tokens when the model sets no length at all; a
# server wants a useful default instead, so that one case (only) gets this number of new tokens.
DEFAULT_MAX_NEW_TOKENS = 256
MAX_TOP_LOGPROBS = 20
# Below this temperature a request is greedy (vLLM's rule, 1e-5): dividing logits by a smaller
# number overflows float32 and turns the whole distribution into NaN.
MIN_TEMPERATURE = 1e-5
# HF's repetition penalty divides (or multiplies) logits by it; outside this range the scores overflow
# or every seen token is wiped out, which no sensible request wants.
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(slots=True)
class SamplingParams:
    """Per-request generation settings, validated on construction (``ValueError`` names the field).

    A temperature below ``MIN_TEMPERATURE`` (1e-5; 0 included) means greedy (``do_sample`` is forced
    to False). Sampling-only settings
    (temperature, top_k, top_p, min_p, typical_p) are ignored when ``do_sample`` is False, like in
    ``generate()``. ``frequency_penalty``/``presence_penalty`` are OpenAI's, counted over generated
    tokens only; ``repetition_penalty`` is HF's (over prompt and output).

    Example::

        SamplingParams(max_new_tokens=16, do_sample=True, top_p=0.9, seed=0)
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    eos_token_id: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    # Log-probability of each prompt token under the model (None: not computed), with this many
    # alternatives each; the prompt is then computed in full even when its prefix is cached.
    prompt_logprobs: int | None = None
    num_return_sequences: int = 1
    skip_special_tokens: bool = True
    # Constrained decoding (at most one): a JSON schema (dict, JSON text, pydantic model class, or True
    # for any JSON object), a regex, an EBNF grammar (xgrammar's dialect) or a list of allowed outputs.
    json_schema: Any = None
    regex: str | None = None
    grammar: str | None = None
    choices: list[str] | None = None
    constraint: tuple[str, str] | None = field(default=None, init=False)  # (kind, text), derived

    def __post_init__(self) -> None:
        self.max_new_tokens = _int("max_new_tokens", self.max_new_tokens, low=1)
        self.min_new_tokens = _int("min_new_tokens", self.min_new_tokens, low=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens "
                             f"({self.max_new_tokens})")
        self.do_sample = _bool("do_sample", self.do_sample)
        self.temperature = _float("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        if self.temperature < MIN_TEMPERATURE:
            # OpenAI/TGI clients say "greedy" with temperature 0; generate() would reject it when sampling,
            # and a tiny positive one would overflow the scores.
            self.do_sample = False
        self.top_k = _int("top_k", self.top_k, low=0)
        self.top_p = _float("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        if self.min_p is not None:
            self.min_p = _float("min_p", self.min_p, "in [0, 1] or None", lambda v: 0 <= v <= 1)
        self.typical_p = _float("typical_p", self.typical_p, "in (0, 1]", lambda v: 0 < v <= 1)
        lo, hi = REPETITION_PENALTY_RANGE
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty, f"in [{lo:g}, {hi:g}]",
                                         lambda v: lo <= v <= hi)
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty, "in [-2, 2]",
                                        lambda v: -2 <= v <= 2)
        self.presence_penalty = _float("presence_penalty", self.presence_penalty, "in [-2, 2]",
                                       lambda v: -2 <= v <= 2)
        self.no_repeat_ngram_size = _int("no_repeat_ngram_size", self.no_repeat_ngram_size, low=0)
        self.eos_token_id = _token_list("eos_token_id", self.eos_token_id)
        self.stop = _str_list("stop", self.stop)
        self.ignore_eos = _bool("ignore_eos", self.ignore_eos)
        if self.seed is not None:
            self.seed = _int("seed", self.seed, low=0)
        self.logprobs = _bool("logprobs", self.logprobs)
        self.top_logprobs = _int("top_logprobs", self.top_logprobs, low=0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _int("prompt_logprobs", self.prompt_logprobs, low=0)
            if self.prompt_logprobs > MAX_TOP_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}")
        self.num_return_sequences = _int("num_return_sequences", self.num_return_sequences, low=1)
        if self.num_return_sequences > 1 and not self.do_sample:
            # Same rule as GenerationConfig.validate(): n greedy copies would all be identical.
            raise ValueError(f"num_return_sequences={self.num_return_sequences} needs do_sample=True "
                             "(greedy decoding would return identical sequences)")
        if self.seed is not None and self.seed + self.num_return_sequences - 1 >= 2**64:
            # Sequence i samples with seed + i, and torch generators take 64-bit seeds.
            raise ValueError(f"seed must be below 2**64 - num_return_sequences + 1, got {self.seed}")
        self.skip_special_tokens = _bool("skip_special_tokens", self.skip_special_tokens)
        given = [k for k in ("json_schema", "regex", "grammar", "choices") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)}: give at most one constraint")
        if given:
            from .grammar import normalize

            self.constraint = normalize(given[0], getattr(self, given[0]))

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax of the processed scores."""
        return not self.do_sample

    @classmethod
    def from_request(cls, generation_config: Any = None, *, prompt_length: int | None = None,
                     **kwargs: Any) -> "SamplingParams":
        """Params for one request: ``generation_config`` defaults as ``generate()`` reads them, then ``kwargs``.

        Aliases: ``max_tokens`` -> ``max_new_tokens``, ``stop_strings`` -> ``stop``, ``n`` ->
        ``num_return_sequences``; ``stop`` may be one string. A kwarg whose value is None counts as
        not given (servers pass optional fields that way). ``max_length``/``min_length`` count the prompt too,
        as in generate() (``max_new_tokens``/``min_new_tokens`` win over them); ``prompt_length`` turns them,
        and a config's, into new-token counts. ``pad_token_id`` is accepted and not used (nothing is padded).

        Example::

            SamplingParams.from_request(GenerationConfig(do_sample=True, top_p=0.9), max_tokens=32, n=2)
        """
        allowed = {f.name for f in fields(cls) if f.init}
        given: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        kwargs.pop("pad_token_id", None)
        totals = {k: kwargs.pop(k) for k in ("max_length", "min_length") if k in kwargs}
        totals = {k: _int(k, v, low=0) for k, v in totals.items() if v is not None}
        for key, value in kwargs.items():
            name = _ALIASES.get(key, key)
            if name not in allowed:
                names = sorted(allowed | set(_ALIASES))
                raise ValueError(f"{key}: unknown generation parameter; allowed: {', '.join(names)}")
            if value is None:
                continue
            if name in given:
                raise ValueError(f"{name}: given twice, as {spelled[name]} and as {key}")
            given[name], spelled[name] = value, key
        for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if total in totals and new not in given:
                n = totals[total] - (prompt_length or 0)
                given[new] = max(1, n) if new == "max_new_tokens" else max(0, n)
        values = _config_defaults(generation_config, prompt_length)
        values.update(given)
        if "min_new_tokens" not in given and isinstance(values["max_new_tokens"], int):
            # A config-wide minimum must not make a short request invalid.
            values["min_new_tokens"] = min(values["min_new_tokens"], values["max_new_tokens"])
        return cls(**values)


def merged_config(model_config: Any, given: Any) -> Any:
    """The generation config of a call that passes ``generation_config=given``: its settings over the model's."""
    if given is None:
        return model_config
    from transformers import GenerationConfig

    if not isinstance(given, GenerationConfig):
        raise ValueError(f"generation_config must be a transformers.GenerationConfig, got {type(given).__name__}")
    if model_config is None:
        return given
    merged = copy.deepcopy(model_config)
    merged.update(**given.to_diff_dict())
    return merged


def _config_defaults(gc: Any, prompt_length: int | None) -> dict[str, Any]:
    """Field values generate() would use for ``gc``: the config's, else GenerationConfig's global defaults."""
    from transformers import GenerationConfig

    if gc is None:
        gc = GenerationConfig()
    elif (seen := _WARNED.get(id(gc))) is None or seen() is not gc:
        key = id(gc)
        _WARNED[key] = weakref.ref(gc, lambda _ref: _WARNED.pop(key, None))
        ignored = {k: getattr(gc, k, None) for k in _NOT_APPLIED}
        ignored = {k: v for k, v in ignored.items() if v not in (None, _NOT_APPLIED[k], [], {})}
        if ignored:
            logger.warning("hf_paged: the model's generation_config sets %s, which the engine does not apply: "
                           "its outputs differ there from generate()'s", ", ".join(f"{k}={v!r}" for k, v in
                                                                                   ignored.items()))
    base = GenerationConfig._get_default_generation_params()

    def get(name: str) -> Any:
        value = getattr(gc, name, None)
        return base.get(name) if value is None else value

    out: dict[str, Any] = {name: get(name) for name in (
        "do_sample", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size")}
    out["min_p"] = getattr(gc, "min_p", None)
    out["max_new_tokens"] = _default_max_new_tokens(gc, prompt_length)
    min_new = getattr(gc, "min_new_tokens", None)
    min_len = getattr(gc, "min_length", None)
    if min_new is None and min_len and prompt_length is not None:
        # generate() applies min_length to prompt + output; the engine counts new tokens only.
        min_new = max(0, min_len - prompt_length)
    out["min_new_tokens"] = min_new or 0
    eos = getattr(gc, "eos_token_id", None)
    out["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, numbers.Integral) else list(eos))
    stop = getattr(gc, "stop_strings", None)
    out["stop"] = [] if stop is None else ([stop] if isinstance(stop, str) else list(stop))
    return out


def _default_max_new_tokens(gc: Any, prompt_length: int | None) -> int:
    if getattr(gc, "max_new_tokens", None) is not None:
        return gc.max_new_tokens
    max_length = getattr(gc, "max_length", None)
    if max_length is None:
        return DEFAULT_MAX_NEW_TOKENS
    # generate() treats an explicit max_length as prompt + output; without the prompt length the
    # whole budget is the only bound we know (the engine still caps at the model's context).
    return max(1, max_length - prompt_length) if prompt_length is not None else max_length


# ---------------------------------------------------------------------------- validation helpers
def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _float(name: str, value: Any, allowed: str, ok) -> float:
    # HF's warpers insist on Python floats (TemperatureLogitsWarper rejects an int 1), so coerce here.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _token_list(name: str, value: Any) -> list[int]:
    items = [value] if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise ValueError(f"{name} must be a token id or a list of token ids, got {value!r}")
    return [_int(name, v, low=0) for v in items]


def _str_list(name: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    if any(s == "" for s in items):
        raise ValueError(f"{name} must not contain an empty string (it would match at once)")
    if lone_surrogate(items) is not None:
        raise ValueError(f"{name} contains a lone UTF-16 surrogate, which is not valid Unicode text")
    return list(items)


def lone_surrogate(value: Any) -> str | None:
    """The first lone UTF-16 surrogate in ``value`` (strings, dict keys and values, lists), or None.

    JSON's ``\\ud800`` escapes put such characters into Python strings; no tokenizer can encode them.
    Iterative, so a deeply nested value cannot exhaust the stack.
    """
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            m = _SURROGATE.search(v)
            if m:
                return m.group()
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return None
