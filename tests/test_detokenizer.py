"""IncrementalDetokenizer: deltas add up to decode(), never split a character, never leak a stop string."""
from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_paged.engine import detokenizer as detokenizer_mod
from hf_paged.engine.detokenizer import ByteTable, IncrementalDetokenizer

FFFD = "\ufffd"
LINES = ["héllo wörld 日本語 🙂", "hello world, hello there", "the quick brown fox jumps over the lazy dog",
         "日本語のテキスト 🙂🙂 emoji", "naïve café résumé", "lo lo lo wo wo\n\nend"] * 3
PIECES = ["héllo", " wörld", " 日本語", " 🙂", "lo", " wo", "\n\n", "é", "語", "🙂🙂", "x", " "]
STOPS = ["lo", "ö", "本語", " w", "🙂", "l", "wörld", "\n\n", "xyz", "o w"]


@pytest.fixture(autouse=True, params=["byte-table", "window"])
def path(request, monkeypatch):
    """Every test runs both ways: byte-level tokenizers through their ByteTable (the fast path) and
    through the decode window (the path of every other tokenizer)."""
    if request.param == "window":
        monkeypatch.setattr(detokenizer_mod.ByteTable, "of", classmethod(lambda cls, tok, skip: None))
    return request.param


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE: multi-byte characters end up split over several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(LINES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def run(tok, prompt_ids, gen, skip=True, stop=()):
    d = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip, stop=list(stop))
    deltas = []
    for t in gen:
        deltas.append(d.push(t))
        if d.stopped is not None:
            break
    deltas.append(d.flush())
    return d, deltas


def reference(tok, gen, skip, stops):
    """What the output must be: decode(), cut before the stop string that completes first, and the number of
    tokens read: up to the one that completes it."""
    for k in range(1, len(gen) + 1):
        text = tok.decode(gen[:k], skip_special_tokens=skip)
        if k < len(gen):
            text = text.rstrip(FFFD)  # an incomplete character at the end: nothing is known about it yet
        hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if hits:
            _, start, s = min(hits)
            return text[:start], s, k
    return tok.decode(gen, skip_special_tokens=skip), None, len(gen)


def token_lists(vocab: int):
    """Random ids mixed with the ids of real multi-byte text."""
    return st.lists(st.one_of(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=3),
                              st.lists(st.sampled_from(PIECES), min_size=1, max_size=3).map(lambda p: ("".join(p),))),
                    max_size=12)


def flatten(tok, parts) -> list[int]:
    ids: list[int] = []
    for p in parts:
        ids += tok(p[0], add_special_tokens=False).input_ids if isinstance(p, tuple) else p
    return ids


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), skip=st.booleans(), prompt=st.sampled_from(["", "héllo", "日本", "<s>the"]),
       stops=st.lists(st.sampled_from(STOPS), max_size=3, unique=True))
def test_deltas_add_up_to_decode(tok, data, skip, prompt, stops):
    gen = flatten(tok, data.draw(token_lists(len(tok))))
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    d, deltas = run(tok, prompt_ids, gen, skip, stops)
    want, want_stop, want_tokens = reference(tok, gen, skip, stops)
    assert "".join(deltas) == d.text == want
    assert d.stopped == want_stop
    assert d.num_tokens == want_tokens  # stopped at the token that completed the stop, on either path
    for s in stops:
        assert s not in "".join(deltas)
    # Without stops, each delta of valid text is whole characters: U+FFFD only where decode() has one.
    if not stops and FFFD not in want:
        assert all(FFFD not in x for x in deltas)


def test_emoji_split_over_byte_tokens_never_yields_replacement(tok):
    text = "a🙂b日本語é🙂"
    byte_tokens = [tok.convert_tokens_to_ids(c) for c in _byte_level(text)]
    assert len(byte_tokens) == len(text.encode())
    d, deltas = run(tok, [], byte_tokens)
    assert "".join(deltas) == text
    assert all(FFFD not in x for x in deltas)
    # Each character comes out whole, on the token that completes it.
    assert [x for x in deltas if x] == list(text)


def test_stop_string_across_tokens_is_caught_and_not_leaked(tok):
    pieces = ["hel", "lo", " w", "ö", "rld", " 🙂"]
    gen = flatten(tok, [(p,) for p in pieces])
    d, deltas = run(tok, [], gen, stop=["o wö", "zzz"])
    assert d.stopped == "o wö"
    assert "".join(deltas) == d.text == "hell"
    assert d.num_tokens < len(gen)  # stopped before the end
    # Held back while it could still become the stop, released when it did not.
    d, deltas = run(tok, [], flatten(tok, [("hello",), (" wa",)]), stop=["o wö"])
    assert d.stopped is None and "".join(deltas) == "hello wa"
    assert d.text == "hello wa"


def test_stop_inside_one_token_and_pushes_after_stop(tok):
    d = IncrementalDetokenizer(tok, [], stop=["ll"])
    out = "".join(d.push(t) for t in tok("hello world", add_special_tokens=False).input_ids)
    assert out == "he" and d.stopped == "ll"
    assert d.push(5) == "" and d.flush() == "" and d.text == "he"


def test_skip_special_tokens(tok):
    gen = tok("hi", add_special_tokens=False).input_ids + [tok.eos_token_id]
    _, deltas = run(tok, [tok.bos_token_id], gen, skip=True)
    assert "".join(deltas) == "hi"
    _, deltas = run(tok, [tok.bos_token_id], gen, skip=False)
    assert "".join(deltas) == "hi</s>"


def test_flush_releases_incomplete_bytes_like_decode(tok):
    ids = [tok.convert_tokens_to_ids(c) for c in _byte_level("ok🙂")][:-1]  # last byte missing
    d, deltas = run(tok, [], ids)
    assert deltas[-1].endswith(FFFD)
    assert "".join(deltas) == tok.decode(ids) == d.text


def test_window_stays_short(tok):
    d = IncrementalDetokenizer(tok, [], stop=[])
    ids = tok("the quick brown fox " * 50, add_special_tokens=False).input_ids
    for t in ids:
        d.push(t)
        assert len(d._ids) <= 8
    assert d.flush() == "" and d.text == "the quick brown fox " * 50


def test_bad_stop():
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(None, [], stop=[""])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), skip=st.booleans(), stops=st.lists(st.sampled_from(STOPS), max_size=2, unique=True))
def test_smollm2_tokenizer(smol_tok, data, skip, stops):
    chat = smol_tok.apply_chat_template([{"role": "user", "content": "Hi 🙂"}], add_generation_prompt=True,
                                        tokenize=True)
    prompt_ids = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    gen = flatten(smol_tok, data.draw(token_lists(len(smol_tok))))
    d, deltas = run(smol_tok, prompt_ids, gen, skip, stops)
    want, want_stop, want_tokens = reference(smol_tok, gen, skip, stops)
    assert "".join(deltas) == d.text == want and d.stopped == want_stop and d.num_tokens == want_tokens


@pytest.fixture(scope="module")
def smol_tok():
    """The default model's tokenizer, converted on first use (never skipped on a fresh clone)."""
    from hf_paged.models import _load_tokenizer, ensure_default_model

    return _load_tokenizer(ensure_default_model())


def _byte_level(text: str) -> list[str]:
    """The byte-level characters of ``text``: one per UTF-8 byte (each is a token of the BPE vocab)."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return list("".join(piece for piece, _ in pre.pre_tokenize_str(text)))


@pytest.fixture(scope="module")
def sp_tok():
    """A SentencePiece-style BPE (Metaspace, byte fallback, leading space stripped on decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  show_progress=False)
    bpe.train_from_iterator(LINES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), prompt=st.sampled_from(["hello", "the quick", "日本"]))
def test_sentencepiece_style_keeps_leading_space_like_the_pipeline(sp_tok, data, prompt):
    # The byte tokens are registered as special here, so keep them (skip_special_tokens=False).
    # Random ids avoid them: ByteFallback turns a whole run of byte tokens into U+FFFDs once one byte
    # is invalid (decode([<0x00>, <0x80>]) == "\ufffd\ufffd"), which no streaming decoder can
    # anticipate; byte tokens of real text (the pieces) are covered.
    first_word = 3 + 256
    ids = st.lists(st.integers(first_word, len(sp_tok) - 1), min_size=1, max_size=3)
    pieces = st.lists(st.sampled_from(PIECES), min_size=1, max_size=3).map(lambda p: ("".join(p),))
    gen = flatten(sp_tok, data.draw(st.lists(st.one_of(ids, pieces), max_size=12)))
    prompt_ids = sp_tok(prompt, add_special_tokens=False).input_ids
    d, deltas = run(sp_tok, prompt_ids, gen, skip=False)
    full, head = sp_tok.decode(prompt_ids + gen), sp_tok.decode(prompt_ids)
    assert "".join(deltas) == d.text == full[len(head):]


def test_sentencepiece_style_first_word(sp_tok):
    ids = sp_tok("hello world the fox 日本", add_special_tokens=False).input_ids
    d, deltas = run(sp_tok, ids[:1], ids[1:], skip=False)
    assert deltas[0] == " world" and "".join(deltas) == " world the fox 日本"
    assert all(FFFD not in x for x in deltas)


def test_the_rust_decode_is_called_directly_only_where_it_equals_decode(smol_tok):
    from hf_paged.engine.detokenizer import fast_decoder

    fast = fast_decoder(smol_tok)
    assert fast is not None  # the default model's tokenizer takes the direct path
    ids = smol_tok("Hello, world!  Ça va? 🙂 <|im_end|>")["input_ids"] + [smol_tok.eos_token_id]
    for skip in (True, False):
        assert fast(ids, skip_special_tokens=skip) == smol_tok.decode(ids, skip_special_tokens=skip)
    before = smol_tok.clean_up_tokenization_spaces
    try:
        smol_tok.clean_up_tokenization_spaces = True  # transformers post-processes: keep its decode
        assert fast_decoder(smol_tok) is None
    finally:
        smol_tok.clean_up_tokenization_spaces = before
    assert fast_decoder(object()) is None


def test_byte_table_only_where_decode_is_byte_concatenation(tok, smol_tok, sp_tok, path):
    if path == "window":
        pytest.skip("about the byte-table path")
    for skip in (True, False):
        assert ByteTable.of(tok, skip) is not None and ByteTable.of(smol_tok, skip) is not None
        assert ByteTable.of(sp_tok, skip) is None  # Metaspace + byte fallback: not a concatenation of bytes
    assert IncrementalDetokenizer(smol_tok, [1, 2])._utf8 is not None
    assert IncrementalDetokenizer(sp_tok, [1, 2])._utf8 is None
    # A table that disagrees with decode() on any checked id is refused.
    broken = type("Broken", (ByteTable,), {"_of": lambda self, t: b"?" if t == 5 else ByteTable._of(self, t)})
    assert broken._checked(smol_tok, True) is None and ByteTable._checked(smol_tok, True) is not None


def test_byte_table_text_only_for_whole_characters(tok, path):
    """A token's memoised text is what the incremental decoder gives for it with nothing buffered: only where its
    bytes are whole UTF-8 characters; bytes of an unfinished character (or not UTF-8) take the decoder."""
    if path == "window":
        pytest.skip("about the byte-table path")
    table = ByteTable.of(tok, True)
    whole = tok.convert_tokens_to_ids("h")
    first, *rest = [tok.convert_tokens_to_ids(c) for c in _byte_level("🙂")]
    assert table.text(whole) == "h" and table.text(first) is None
    assert table._texts[whole] == "h" and table._texts[first] is None  # memoised, the partial bytes too
    # A whole-character token right after bytes of an unfinished one goes through the decoder (it completes or
    # replaces them), and the text is decode()'s.
    ids = [whole, first, *rest, whole, first, whole]
    _, deltas = run(tok, [], ids)
    assert "".join(deltas) == tok.decode(ids) == "h🙂h\ufffdh"


def test_a_stop_string_completed_by_the_final_flush_names_the_reason(tok):
    """A token holding a finished character and the first byte of the next ("aÃ": "a" and half of "ï") ends the
    output. The decode window holds both back until the end, where flushing them completes the stop string
    "a": the sequence then ended at that stop (its reason and stop string say so), not at its length limit."""
    from hf_paged.engine.delivery import Delivery
    from hf_paged.engine.engine import TokenRecord
    from hf_paged.engine.outputs import FinishReason
    from hf_paged.engine.params import SamplingParams
    from hf_paged.engine.request import Request
    from hf_paged.engine.sequence import Sequence, SeqStatus

    class Engine:  # what Delivery asks of the engine
        def add(self, prompt_ids, params, grammar, adapter):
            self.seq = Sequence(1, list(prompt_ids), len(prompt_ids), params)
            return [self.seq]

        def finish(self, seq, reason):
            seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    token = tok.convert_tokens_to_ids("aÃ")
    engine = Engine()
    delivery = Delivery(engine, tok)
    params = SamplingParams.from_request(None, max_new_tokens=1, stop=["a"])
    req = Request("r", "", [], params, lambda r: None)
    delivery.add(req)
    engine.seq.token_ids.append(token)
    engine.finish(engine.seq, FinishReason.LENGTH)  # what the engine did on recording its last token
    delivery.deliver([TokenRecord(1, token, None, None, FinishReason.LENGTH)])
    events = list(req)
    out = events[-1].output.outputs[0]
    assert (out.text, out.finish_reason, out.stop_string) == ("", FinishReason.STOP, "a")
    assert [(e.token_id, e.text, e.finish_reason, e.stop_string) for e in events[:-1]] == \
        [(token, "", FinishReason.STOP, "a")]


def test_a_stop_before_an_unfinished_character_ends_at_its_token(tok):
    """A token holding the end of a stop string and the first byte of the next character ("aÃ": "a", then half
    of "ï") ends the output at that token, on both paths: the decode window holds such a token back until its
    character is complete, which found the stop one token late (that token then stayed in the output ids)."""
    half = tok.convert_tokens_to_ids("aÃ")
    rest = tok.convert_tokens_to_ids(_byte_level("ï")[1])
    gen = tok("x", add_special_tokens=False).input_ids + [half, rest] + tok("bc", add_special_tokens=False).input_ids
    assert tok.decode(gen) == "xaïbc"
    for stop, text in (["a"], "x"), (["xa"], ""), (["aï"], "x"):
        d, deltas = run(tok, [], gen, stop=stop)
        assert (d.stopped, "".join(deltas), d.text) == (stop[0], text, text)
        assert d.num_tokens == (2 if stop != ["aï"] else 3)
