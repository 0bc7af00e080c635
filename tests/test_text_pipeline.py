"""hf_paged.pipeline("text-generation") against transformers.pipeline("text-generation") on the same tiny model
(the default model's tokenizer and chat template): the same records for the same arguments."""
from __future__ import annotations

import time

import pytest
import torch
import transformers as tf

import hf_paged

CHAT = [{"role": "user", "content": "Hi there"}]
# Before 5.24 transformers' pipeline let its default max_new_tokens override a call's max_length, and made a
# stop_sequence's tokens EOS ids instead of stop strings; hf_paged follows 5.24.
NEW_PIPELINE = tuple(int(x) for x in tf.__version__.split(".")[:2]) >= (5, 24)


@pytest.fixture(scope="module")
def tiny_chat():
    from hf_paged.models import _load_tokenizer, ensure_default_model

    tok = _load_tokenizer(ensure_default_model())
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = tok.eos_token_id
    return model, tok


def ours(tiny_chat, inputs, init=None, **kw):
    model, tok = tiny_chat
    gen = hf_paged.pipeline("text-generation", model=model, tokenizer=tok, kv_memory="32MiB", **(init or {}))
    try:
        return gen(inputs, **kw)
    finally:
        gen.close()
        hf_paged.unwrap(model)


def theirs(tiny_chat, inputs, init=None, **kw):
    model, tok = tiny_chat
    return tf.pipeline("text-generation", model=model, tokenizer=tok, **(init or {}))(inputs, **kw)


GREEDY = dict(do_sample=False, max_new_tokens=8)


@pytest.mark.parametrize("case", [
    dict(inputs="Hello world"),
    dict(inputs=["Hello world", "The sky is"], return_full_text=False),
    dict(inputs=CHAT),
    dict(inputs=[CHAT, CHAT + [{"role": "assistant", "content": "Sure"}]]),
    dict(inputs=CHAT + [{"role": "assistant", "content": "Sure"}]),  # a prefill: continued, not closed
    dict(inputs=CHAT + [{"role": "assistant", "content": "Sure"}], continue_final_message=False),
    dict(inputs="Hello world", return_tensors=True),
    dict(inputs="Hello world", return_text=False),
    dict(inputs="Hello world", prefix="Once upon a time. "),
    dict(inputs="Hello world", max_length=9, max_new_tokens=None),
    dict(inputs="Hello world", generation_config=tf.GenerationConfig(max_new_tokens=3, do_sample=False)),
    dict(inputs="Hello world", batch_size=4, pad_token_id=0, clean_up_tokenization_spaces=True),
    dict(inputs=""), dict(inputs="", return_tensors=True),  # from the BOS token, as generate() without ids
], ids=["text", "batch-new-text", "chat", "chats", "prefill", "prefill-closed", "tensors", "return-text-false",
        "prefix", "max-length", "generation-config", "ignored-and-decode-options", "empty",
        "empty-tensors"])
def test_same_records_as_transformers(tiny_chat, case):
    if "max_length" in case and not NEW_PIPELINE:
        pytest.skip("transformers before 5.24 ignores a call's max_length in its pipeline")
    kw = {**GREEDY, **case}
    if "generation_config" in kw:
        kw.pop("do_sample"), kw.pop("max_new_tokens")
    kw = {k: v for k, v in kw.items() if v is not None}
    inputs = kw.pop("inputs")
    assert ours(tiny_chat, inputs, **kw) == theirs(tiny_chat, inputs, **kw)


@pytest.mark.skipif(not NEW_PIPELINE, reason="transformers before 5.24 makes stop_sequence an EOS id")
def test_a_stop_sequence_is_in_the_text_as_transformers_decodes_it(tiny_chat):
    free = theirs(tiny_chat, "Hello world", return_full_text=False, do_sample=False, max_new_tokens=12)
    text = free[0]["generated_text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    got = ours(tiny_chat, "Hello world", stop_sequence=stop, do_sample=False, max_new_tokens=12)
    assert got == theirs(tiny_chat, "Hello world", stop_sequence=stop, do_sample=False, max_new_tokens=12)
    assert stop in got[0]["generated_text"]


def test_generation_parameters_given_to_pipeline_apply_to_every_call(tiny_chat):
    init = dict(max_new_tokens=3, do_sample=False)
    assert ours(tiny_chat, "Hello world", init=init) == theirs(tiny_chat, "Hello world", init=init)
    # A call's own win over them.
    assert ours(tiny_chat, "Hello world", init=init, max_new_tokens=5) == \
        theirs(tiny_chat, "Hello world", init=init, max_new_tokens=5)


def test_transformers_pipeline_defaults_sample_256_tokens(tiny_chat):
    """Like transformers' pipeline: sampling at temperature 0.7 and 256 new tokens where neither the call nor
    the model's generation config says otherwise (so its docstring's num_return_sequences=2 example runs)."""
    out = ours(tiny_chat, "a", num_return_sequences=2, max_new_tokens=4, seed=1)
    assert len(out) == 2
    model, tok = tiny_chat
    gen = hf_paged.pipeline("text-generation", model=model, tokenizer=tok, kv_memory="32MiB")
    try:
        assert gen._kwargs({}) == {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
        assert gen._kwargs({"do_sample": False}) == {"max_new_tokens": 256, "do_sample": False}
        assert gen._kwargs({"max_length": 30}) == {"max_length": 30, "do_sample": True, "temperature": 0.7}
    finally:
        gen.close()
        hf_paged.unwrap(model)


def test_bad_arguments_are_clear_errors(tiny_chat):
    for flags in (dict(return_full_text=True, return_text=True), dict(return_full_text=True, return_tensors=True),
                  dict(return_tensors=True, return_text=True)):
        with pytest.raises(ValueError, match="mutually exclusive"):
            ours(tiny_chat, "Hello", **flags)
    with pytest.raises(ValueError, match="documents: not supported"):
        ours(tiny_chat, CHAT, documents=[{"text": "x"}])
    with pytest.raises(ValueError, match="handle_long_generation"):
        ours(tiny_chat, "Hello", handle_long_generation="cut")
    with pytest.raises(ValueError, match="frobnicate: unknown generation parameter"):
        hf_paged.pipeline("text-generation", model=tiny_chat[0], tokenizer=tiny_chat[1], frobnicate=1)


def test_hole_keeps_the_end_of_a_prompt_too_long_for_the_context(tiny_chat):
    model, tok = tiny_chat
    long = " ".join(["word"] * 600)
    with pytest.raises(ValueError, match="context"):
        ours(tiny_chat, long, do_sample=False, max_new_tokens=4)
    out = ours(tiny_chat, long, do_sample=False, max_new_tokens=4, handle_long_generation="hole",
               return_full_text=False)
    ids = tok(long)["input_ids"][-(512 - 4):]
    model_out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"] == tok.decode(model_out[0, len(ids):], skip_special_tokens=True)


def test_generators_and_datasets_are_read_lazily_and_answered_by_an_iterator(tiny_chat):
    """As transformers' pipeline: a generator or a torch Dataset gets an iterator, each item's records in order,
    reading the input only as far as the requests in flight (twice max_num_seqs); leaving early cancels them."""
    from transformers.pipelines.pt_utils import KeyDataset

    model, tok = tiny_chat
    prompts = ["Hello world", "The sky is", "Once", "A cat", "Why"]
    read = []

    def source():
        for p in prompts:
            read.append(p)
            yield p

    expected = list(theirs(tiny_chat, (p for p in prompts), **GREEDY))
    gen = hf_paged.pipeline("text-generation", model=model, tokenizer=tok, kv_memory="32MiB", max_num_seqs=1)
    try:
        it = gen(source(), **GREEDY)
        assert not read and iter(it) is it  # nothing is read before the first record is asked for
        first = next(it)
        assert len(read) == 2  # the window: two requests in flight for max_num_seqs=1
        assert [first] + list(it) == expected
        assert list(gen(KeyDataset([{"text": p} for p in prompts], "text"), **GREEDY)) == expected

        class Stream(torch.utils.data.IterableDataset):  # no len(): read by iterating
            def __iter__(self):
                return iter(prompts)

        assert list(gen(Stream(), **GREEDY)) == expected
        assert gen(prompts, **GREEDY) == expected  # a list is answered with a list, as before

        read.clear()
        it = gen(source(), do_sample=False, max_new_tokens=200)
        next(it)
        it.close()  # the one still in flight is cancelled, and its blocks come back
        deadline = time.monotonic() + 30
        while gen.engine.pool.allocator.num_used and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gen.engine.pool.allocator.num_used == 0 and len(read) == 2

        def bad():
            yield "Hello world"
            yield "word " * 600
        with pytest.raises(ValueError, match="exceeds the model's context"):
            list(gen(bad(), **GREEDY))
    finally:
        gen.close()
        hf_paged.unwrap(model)
