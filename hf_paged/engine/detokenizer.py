"""IncrementalDetokenizer: text deltas for a stream of generated tokens, UTF-8 safe, with stop strings.

Decoding the whole output again for every token costs O(length) per token. Instead only a short
window is decoded: ``ids[prefix:]`` where ``ids[prefix:read]`` is text already emitted, kept as
left context (it decides spaces and merges for tokenizers whose decoding is not a plain
concatenation); the new text is what the window decodes to beyond that context. While the window
ends in U+FFFD the last token(s) hold an incomplete UTF-8 sequence (a byte-level BPE splits
multi-byte characters over tokens), so nothing is emitted until a later token completes it.

A byte-level BPE tokenizer (``decode`` = concatenate the tokens' bytes, then UTF-8) skips the window:
each token's bytes (:class:`ByteTable`, checked once per tokenizer against ``decode``) go through Python's
incremental UTF-8 decoder, which holds an unfinished character's bytes itself; about 3x cheaper a token.

Stop strings can span tokens, so text that could be the start of a stop string is held back until
it either completes the stop (the text ends before it, nothing of it leaks) or stops matching.

Example::

    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["\\n\\n"])
    for t in generated:
        print(detok.push(t), end="")
        if detok.stopped is not None:
            break
    print(detok.flush())
"""
from __future__ import annotations

import codecs
import threading
import weakref
from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context for the first generated tokens (a leading space of the first
# word, a merge across the prompt boundary); a few are enough.
_PROMPT_CONTEXT = 4


def fast_decoder(tokenizer: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer.decode`` behind ``tokenizer.decode``, where calling it directly gives
    the same text: a transformers fast tokenizer whose ``decode``/``_decode`` are not overridden and that
    does no clean-up of spaces. ``decode`` runs twice per generated token and transformers' Python layers
    around the Rust call (argument conversion, batching checks) cost more than the decoding; None otherwise."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: always the public decode
        return None
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (isinstance(tokenizer, TokenizersBackend) and cls._decode is TokenizersBackend._decode
            and cls.decode is PreTrainedTokenizerBase.decode and backend is not None
            and not getattr(tokenizer, "clean_up_tokenization_spaces", False)):
        return backend.decode
    return None


_SINGLE: "weakref.WeakKeyDictionary[Any, dict[bool, dict[int, str]]]" = weakref.WeakKeyDictionary()
_SINGLE_LOCK = threading.Lock()


def _single_token_texts(tokenizer: Any, skip_special_tokens: bool) -> dict[int, str]:
    """The memo of ``decode([token])`` shared by every detokenizer of ``tokenizer`` (a plain dict: one
    writer per key gives the same value, so concurrent use is safe); a private one if it cannot be shared."""
    try:
        with _SINGLE_LOCK:
            return _SINGLE.setdefault(tokenizer, {}).setdefault(skip_special_tokens, {})
    except TypeError:  # not weak-referenceable or not hashable
        return {}


def _byte_chars() -> dict[str, int]:
    """The byte-level BPE alphabet: the character that stands for each byte in a token's text (printable
    Latin-1 characters stand for themselves, the other bytes for characters from U+0100 on, in order)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)}
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


class ByteTable:
    """The bytes each token id decodes to, for a tokenizer whose ``decode`` is "concatenate the tokens'
    bytes, then UTF-8 with replacement" (a byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM). With it a
    detokenizer turns a token into text with a dict lookup and Python's incremental UTF-8 decoder, instead
    of a Rust decode call per token plus the window bookkeeping. Filled lazily; shared by every
    detokenizer of the tokenizer (one writer per key writes the same value, so concurrent use is safe)."""

    _CHARS = _byte_chars()

    def __init__(self, backend: Any, skip_special_tokens: bool) -> None:
        self._backend = backend
        self._skip = {i for i, t in backend.get_added_tokens_decoder().items() if t.special} \
            if skip_special_tokens else set()
        self._bytes: dict[int, bytes] = {}
        self._texts: dict[int, str | None] = {}

    def get(self, token: int) -> bytes:
        b = self._bytes.get(token)
        if b is None:
            b = self._bytes[token] = self._of(token)
        return b

    def text(self, token: int) -> str | None:
        """The token's bytes as text where they are whole UTF-8 characters (what an incremental decoder
        holding no bytes gives for them), else None (they end inside a character, or are not UTF-8)."""
        try:
            return self._texts[token]
        except KeyError:
            pass
        try:
            t = self.get(token).decode("utf-8")
        except UnicodeDecodeError:
            t = None
        self._texts[token] = t
        return t

    def _of(self, token: int) -> bytes:
        if token in self._skip:
            return b""
        text = self._backend.id_to_token(token)
        if text is None:  # not in the vocabulary: decode() leaves it out
            return b""
        chars = self._CHARS
        if all(c in chars for c in text):
            return bytes(chars[c] for c in text)
        return text.encode()  # an added token written in plain text (the decoder keeps such tokens as they are)

    @classmethod
    def of(cls, tokenizer: Any, skip_special_tokens: bool) -> "ByteTable | None":
        """The shared table of ``tokenizer``, or None when its decode is not such a concatenation (checked
        on its decoder's type, then on every added token, a spread of vocabulary ids, pairs of them and an
        id past the vocabulary, each against ``decode`` itself)."""
        try:
            with _SINGLE_LOCK:
                memo = _TABLES.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable or not hashable
            memo = {}
        if skip_special_tokens not in memo:
            memo[skip_special_tokens] = cls._checked(tokenizer, skip_special_tokens)
        return memo[skip_special_tokens]

    @classmethod
    def _checked(cls, tokenizer: Any, skip_special_tokens: bool) -> "ByteTable | None":
        decode = fast_decoder(tokenizer)
        if decode is None:
            return None
        try:
            from tokenizers.decoders import ByteLevel
        except ImportError:
            return None
        backend = tokenizer._tokenizer
        if not isinstance(backend.decoder, ByteLevel):
            return None
        table = cls(backend, skip_special_tokens)
        n = backend.get_vocab_size(with_added_tokens=True)
        ids = sorted({*backend.get_added_tokens_decoder(), *range(0, n, max(1, n // 512)), n - 1, n + 7})
        pairs = [[a, b] for a, b in zip(ids, reversed(ids))]
        for case in [[i] for i in ids] + pairs:
            want = decode(case, skip_special_tokens=skip_special_tokens)
            if b"".join(table.get(i) for i in case).decode("utf-8", "replace") != want:
                return None
        return table


_TABLES: "weakref.WeakKeyDictionary[Any, dict[bool, ByteTable | None]]" = weakref.WeakKeyDictionary()


class IncrementalDetokenizer:
    """Turns pushed token ids into text deltas (see the module docstring).

    Invariant: ``"".join(deltas) + flush() == text``. Without a stop string ``text`` is
    ``decode(prompt + generated)[len(decode(prompt)):]``, the continuation HF's text-generation
    pipeline returns; for byte-level BPE that is exactly ``decode(generated)``, and SentencePiece-style
    decoders keep the leading space of the first word (``decode(generated)`` alone would drop it).
    With a stop string ``text`` is cut before the stop that completed first.

    Example::

        d = IncrementalDetokenizer(tok, tok("Hi").input_ids, stop=["!"])
        d.push(tok.convert_tokens_to_ids("Ġthere"))   # " there"
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = ()) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        self._tok = tokenizer
        self._fast = fast_decoder(tokenizer)
        self._skip = skip_special_tokens
        self._single = _single_token_texts(tokenizer, skip_special_tokens)
        self._stops = tuple(stop)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        # Byte-level tokenizers: bytes per token into an incremental UTF-8 decoder. No prompt context is
        # needed: decode(prompt + output) continues decode(prompt) with decode(output) unless the prompt
        # ends inside a character, where the window path below starts without context too.
        self._table = ByteTable.of(tokenizer, skip_special_tokens) if tokenizer is not None else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self._table is not None else None
        context = list(prompt_ids[-_PROMPT_CONTEXT:]) if self._utf8 is None else []
        # Context cut inside a multi-byte character would decode to U+FFFD; start without it then.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = context
        self._prefix = 0  # ids[prefix:read]: emitted text kept as context
        self._read = len(context)  # ids[read:]: tokens not yet turned into text
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached while waiting for bytes
        self._emitted: list[str] = []
        self._pending = ""  # decoded text held back because it may begin a stop string
        self._num_tokens = 0
        self._flushed = False
        self.stopped: str | None = None

    @property
    def text(self) -> str:
        """The text so far (including text held back for stop matching); cut before a matched stop."""
        return "".join(self._emitted) + self._pending

    @property
    def num_tokens(self) -> int:
        """How many tokens were pushed."""
        return self._num_tokens

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that became final ("" while bytes or a stop are pending)."""
        if self._flushed:
            raise RuntimeError("push() after flush()")
        self._num_tokens += 1
        if self.stopped is not None:
            return ""  # the output already ended at a stop string
        utf8 = self._utf8
        if utf8 is not None:
            # The usual token: whole characters, with no bytes of an unfinished one waiting in the decoder.
            new = self._table.text(int(token_id)) if not utf8.buffer else None
            if new is None:
                new = utf8.decode(self._table.get(int(token_id)))
            if not new:
                return ""  # a token without text, or bytes of an unfinished character
            if not self._stops:
                self._emitted.append(new)  # what _emit does without stop strings
                return new
            return self._emit(new)
        self._ids.append(int(token_id))
        new = self._decode_window()
        if not new or new.endswith(_REPLACEMENT):
            # Incomplete bytes wait for the rest; a token with no text (a skipped special token)
            # stays in the window so the context keeps real text for the next word's spacing. The whole
            # characters before such bytes may complete a stop string: the output ends at this token then
            # (as on the byte path, whose UTF-8 decoder gives them at once), not one token later.
            head = new.rstrip(_REPLACEMENT) if new and self._stops else ""
            if head and any(s in self._pending + head for s in self._stops):
                return self._emit(head)
            return ""
        self._advance()
        return self._emit(new)

    def flush(self) -> str:
        """End of output: release held-back text (incomplete bytes decode to U+FFFD, like decode())."""
        if self._flushed:
            return ""
        self._flushed = True
        if self.stopped is not None:
            return ""
        out = ""
        if self._utf8 is not None:
            rest = self._utf8.decode(b"", final=True)  # an unfinished character: U+FFFD, as decode() gives
            if rest:
                out = self._emit(rest)
        elif self._read < len(self._ids):
            out = self._emit(self._decode_window() or "")
            self._advance()
        if self.stopped is None:
            out += self._pending
            self._emitted.append(self._pending)
            self._pending = ""
        return out

    # ------------------------------------------------------------------ internals
    def _decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast(ids, skip_special_tokens=self._skip)
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _decode_window(self) -> str | None:
        """Text of ``ids[read:]`` decoded in context, or None when the context no longer prefixes it."""
        if self._prefix_text is None:
            if self._read - self._prefix == 1:
                # The usual context: the one token emitted last. Its text alone is memoised per tokenizer,
                # which saves one of the two decode calls per token.
                tok = self._ids[self._prefix]
                text = self._single.get(tok)
                if text is None:
                    text = self._single[tok] = self._decode([tok])
                self._prefix_text = text
            else:
                self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if not window.startswith(self._prefix_text):
            # Only possible for a non-local decoder; the context changes, the cut is still right.
            return window[len(self._prefix_text) :] if len(window) > len(self._prefix_text) else None
        return window[len(self._prefix_text) :]

    def _advance(self) -> None:
        # The text just emitted becomes the next context; drop ids before it so the list stays short.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = None

    def _emit(self, new: str) -> str:
        if not self._stops:
            self._emitted.append(new)
            return new
        text = self._pending + new
        # pending never holds a whole stop string, so any match ends inside `new`.
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            i = text.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            # The stop that completes first wins (it is where generation would have stopped).
            _, i, s = best
            self.stopped = s
            self._pending = ""
            self._emitted.append(text[:i])
            return text[:i]
        hold = self._stop_prefix_len(text)
        cut = len(text) - hold
        self._pending = text[cut:]
        self._emitted.append(text[:cut])
        return text[:cut]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._max_stop - 1), 0, -1):
            tail = text[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self._stops):
                return k
        return 0
