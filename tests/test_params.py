"""SamplingParams: generate()'s defaults from a generation_config, aliases, and field-naming ValueErrors."""
from __future__ import annotations

import pytest
from transformers import GenerationConfig

from hf_paged.engine.params import DEFAULT_MAX_NEW_TOKENS, SamplingParams


def test_defaults_of_an_empty_config_are_generates_global_defaults():
    p = SamplingParams.from_request(GenerationConfig())
    assert (p.do_sample, p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) == (False, 1.0, 50, 1.0, None, 1.0)
    assert (p.repetition_penalty, p.no_repeat_ngram_size, p.min_new_tokens) == (1.0, 0, 0)
    assert p.max_new_tokens == DEFAULT_MAX_NEW_TOKENS and p.eos_token_id == [] and p.stop == []
    assert p.is_greedy
    assert SamplingParams.from_request(None) == p


def test_defaults_follow_the_model_generation_config():
    gc = GenerationConfig(do_sample=True, temperature=0.6, top_k=20, top_p=0.95, min_p=0.05, typical_p=0.9,
                          repetition_penalty=1.1, no_repeat_ngram_size=3, max_new_tokens=77, min_new_tokens=2,
                          eos_token_id=[2, 7], stop_strings="\n\n")
    p = SamplingParams.from_request(gc)
    assert (p.do_sample, p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) == (True, 0.6, 20, 0.95, 0.05, 0.9)
    assert (p.repetition_penalty, p.no_repeat_ngram_size) == (1.1, 3)
    assert (p.max_new_tokens, p.min_new_tokens, p.eos_token_id, p.stop) == (77, 2, [2, 7], ["\n\n"])
    assert not p.is_greedy
    assert SamplingParams.from_request(GenerationConfig(eos_token_id=5)).eos_token_id == [5]


def test_max_length_only_is_derived_like_generate():
    gc = GenerationConfig(max_length=100, min_length=30)
    assert SamplingParams.from_request(gc, prompt_length=40).max_new_tokens == 60
    assert SamplingParams.from_request(gc, prompt_length=40).min_new_tokens == 0
    p = SamplingParams.from_request(gc, prompt_length=10)
    assert (p.max_new_tokens, p.min_new_tokens) == (90, 20)
    assert SamplingParams.from_request(gc).max_new_tokens == 100  # prompt unknown: the whole budget
    assert SamplingParams.from_request(gc, prompt_length=200).max_new_tokens == 1


def test_kwargs_override_and_aliases():
    gc = GenerationConfig(do_sample=True, temperature=0.6, max_new_tokens=10, eos_token_id=2)
    p = SamplingParams.from_request(gc, max_tokens=5, stop="END", n=3, temperature=1.2, top_k=None, seed=4)
    assert (p.max_new_tokens, p.stop, p.num_return_sequences, p.temperature, p.top_k, p.seed) == \
        (5, ["END"], 3, 1.2, 50, 4)
    assert SamplingParams.from_request(gc, stop_strings=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams.from_request(gc, eos_token_id=9).eos_token_id == [9]
    # A config-wide min_new_tokens never makes a shorter request invalid.
    assert SamplingParams.from_request(GenerationConfig(min_new_tokens=8), max_tokens=3).min_new_tokens == 3


def test_temperature_zero_means_greedy():
    p = SamplingParams.from_request(GenerationConfig(do_sample=True), temperature=0)
    assert p.is_greedy and p.do_sample is False and p.temperature == 0.0


def test_ints_become_floats_for_hf_processors():
    p = SamplingParams(max_new_tokens=4, temperature=2, repetition_penalty=1, top_p=1)
    assert type(p.temperature) is float and type(p.repetition_penalty) is float and type(p.top_p) is float


INVALID = [
    ("max_new_tokens", 0), ("max_new_tokens", -3), ("max_new_tokens", 2.5), ("max_new_tokens", "10"),
    ("max_new_tokens", True),
    ("min_new_tokens", -1), ("min_new_tokens", 11),
    ("temperature", -0.1), ("temperature", "hot"), ("temperature", float("nan")), ("temperature", None),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.0),
    ("min_p", -0.1), ("min_p", 1.1), ("typical_p", 0.0), ("typical_p", 1.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("frequency_penalty", 2.5), ("frequency_penalty", -2.1), ("presence_penalty", 3.0),
    ("no_repeat_ngram_size", -1), ("num_return_sequences", 0), ("top_logprobs", -1), ("top_logprobs", 21),
    ("do_sample", "yes"), ("logprobs", 1), ("ignore_eos", None), ("skip_special_tokens", "no"),
    ("eos_token_id", "2"), ("eos_token_id", [-1]), ("stop", [""]), ("stop", [1]), ("stop", 5),
    ("seed", -1), ("seed", "x"),
]


def test_invalid_values_name_the_field():
    # One test for all cases (not parametrized): each test costs a full gc pass in conftest's teardown.
    for field, value in INVALID:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{"max_new_tokens": 10, "do_sample": True, field: value})
            pytest.fail(f"{field}={value!r} was accepted")


def test_invalid_values_through_from_request_name_the_field():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams.from_request(GenerationConfig(), max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_request(GenerationConfig(), top_p=2)


def test_greedy_with_several_return_sequences_is_rejected_like_generate():
    with pytest.raises(ValueError, match="num_return_sequences"):
        SamplingParams.from_request(GenerationConfig(), n=2)
    assert SamplingParams.from_request(GenerationConfig(), n=2, do_sample=True).num_return_sequences == 2


def test_unknown_kwarg_lists_allowed_names():
    with pytest.raises(ValueError, match="best_of") as e:
        SamplingParams.from_request(GenerationConfig(), best_of=2)
    assert "temperature" in str(e.value) and "max_tokens" in str(e.value)


def test_alias_and_field_together_is_an_error():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams.from_request(GenerationConfig(), max_tokens=3, max_new_tokens=4)


def test_generation_config_settings_the_engine_does_not_apply_are_named_once(caplog):
    """A model config with beam search or suppressed tokens decodes differently here than with generate(): the
    engine says which settings it leaves out, once per config, and nothing for a config without them."""
    import logging

    cfg = GenerationConfig(num_beams=4, suppress_tokens=[5, 6], do_sample=False)
    with caplog.at_level(logging.WARNING, logger="hf_paged.engine.params"):
        SamplingParams.from_request(cfg, max_tokens=4)
        SamplingParams.from_request(cfg, max_tokens=8)
        SamplingParams.from_request(GenerationConfig(do_sample=True, top_k=5), max_tokens=4)
    warned = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    assert len(warned) == 1 and "num_beams=4" in warned[0] and "suppress_tokens=[5, 6]" in warned[0], warned
