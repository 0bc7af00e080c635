"""Constrained decoding with xgrammar: JSON schemas, regexes, EBNF grammars and fixed choices.

A request's constraint (``SamplingParams.constraint``) is compiled once per pipeline (xgrammar caches
compiled grammars) when the request is submitted, so a bad schema is a ``ValueError`` with
xgrammar's reason before anything is queued. Each sequence gets its own matcher (siblings of ``n``
too); before sampling, its token bitmask sets every token the grammar forbids to -inf, and the sampled
token advances the matcher. A sequence whose grammar is complete ends with its stop token (EOS); one
cut by ``max_new_tokens`` ends with finish reason ``length``. Preemption does not touch matchers: a
recomputed sequence keeps its tokens and its matcher's state.

Example::

    grammars = Grammars(tokenizer, vocab_size=model.config.vocab_size)
    compiled = grammars.compile(("json_schema", '{"type": "object"}'))
    m = new_matcher(compiled); masks = Masks(grammars.vocab_size)
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import torch

from ..kv.metadata import to_device

_LOG_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")
CACHE_BYTES = 256 * 2**20
# xgrammar's compile time grows about with the cube of an object's optional properties (here: 256 in
# 0.12 s, 500 in 1 s, 1000 in 4 s, 3000 in 3 minutes): more than this many in one object are refused.
MAX_OPTIONAL_PROPERTIES = 256
# Whole-schema limits, so that any schema accepted compiles in seconds (the compile cannot be stopped and holds
# the server's one grammar worker): 100 objects of 256 optional properties ran past 20 s, arrays nested 980
# deep too, 10000 enum values took 3 s (here, 2026-12-02). OpenAI's structured outputs allow 10 levels of
# nesting, 5000 properties and 1000 enum values.
MAX_SCHEMA_DEPTH, MAX_SCHEMA_NODES, MAX_OPTIONAL_TOTAL, MAX_ENUM_VALUES = 64, 10000, 1024, 10000
# References, and the nesting they add (a chain of 128 definitions each 60 arrays deep took 6 s; 3000 chained
# references 7 s); a `pattern`'s length (xgrammar's schema converter recursed out of the stack on a pattern
# nested 30000 deep, ending the process).
MAX_REFS, MAX_PATTERN_CHARS, MAX_PATTERN_DEPTH = 256, 4096, 256
# Compiled grammars kept here, so that a request compiled off the event loop is found again on it: the last
# RECENT ones, up to RECENT_BYTES together.
RECENT, RECENT_BYTES = 16, 64 * 2**20
# What SamplingParams accepts, by field; ``json_object`` (any JSON object) is ``json_schema=True``.
KINDS = ("json_schema", "regex", "grammar", "choices")


def normalize(kind: str, value: Any) -> tuple[str, str]:
    """``(kind, text)``: the constraint as xgrammar takes it (a JSON schema as JSON text, a pydantic
    model class as its schema, choices as an alternation grammar). ``ValueError`` on a wrong type."""
    if kind == "json_schema":
        if value is True:
            return ("json_object", "")
        if isinstance(value, type) and hasattr(value, "model_json_schema"):
            value = value.model_json_schema()
        if isinstance(value, dict):
            try:
                return (kind, json.dumps(value))
            except RecursionError:
                raise ValueError("json_schema: nested too deep") from None
        if isinstance(value, str):
            try:
                json.loads(value)
            except ValueError as exc:
                raise ValueError(f"json_schema: not valid JSON ({exc})") from None
            except RecursionError:
                raise ValueError("json_schema: nested too deep") from None
            return (kind, value)
        raise ValueError(f"json_schema must be a dict, JSON text, a pydantic model class or True, got {value!r}")
    if kind in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{kind} must be a non-empty string, got {value!r}")
        return (kind, value)
    if kind == "choices":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError(f"choices must be a non-empty list of non-empty strings, got {value!r}")
        # EBNF string literals: JSON escapes, with characters beyond U+FFFF as they are (not surrogate pairs)
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in value)
        return ("grammar", f"root ::= {alternatives}")
    raise ValueError(f"unknown constraint kind {kind!r}; one of {KINDS}")


class Grammars:
    """Compiles constraints for one tokenizer (thread-safe; compiled grammars are cached)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler = None
        self._lock = threading.Lock()
        self._recent: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def _get(self):
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                except ImportError as exc:  # pragma: no cover - xgrammar is a dependency
                    raise ValueError("constrained decoding needs xgrammar (pip install xgrammar)") from exc
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                # Compiled grammars are cached (LRU, bounded): a repeated schema compiles once.
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_limit_bytes=CACHE_BYTES)
            return self._compiler

    def compile(self, constraint: tuple[str, str]) -> Any:
        """The compiled grammar; ``ValueError`` carrying xgrammar's reason for a bad one. The last few are
        kept, so compiling one again (the server compiles on a worker, then submits) costs nothing even
        when xgrammar's own cache has let it go."""
        with self._lock:
            if constraint in self._recent:
                self._recent.move_to_end(constraint)
                return self._recent[constraint]
        kind, text = constraint
        compiler = self._get()
        try:
            if kind == "json_object":
                # An object (OpenAI's json_object), compact: free whitespace would let a weak model loop on
                # newlines forever.
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind == "json_schema":
                _check_schema(json.loads(text))
                compiled = compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "regex":
                compiled = compiler.compile_regex(text)
            else:
                compiled = compiler.compile_grammar(text)
        except (RuntimeError, ValueError) as exc:
            reason = _reason(exc)
            raise ValueError(reason if reason.startswith(kind) else f"{kind}: {reason}") from None
        with self._lock:
            self._recent[constraint] = compiled
            while len(self._recent) > 1 and (len(self._recent) > RECENT or sum(
                    getattr(c, "memory_size_bytes", 0) for c in self._recent.values()) > RECENT_BYTES):
                self._recent.popitem(last=False)
        return compiled

    def cached(self, constraint: tuple[str, str]) -> bool:
        """Whether :meth:`compile` would return at once (compiled lately)."""
        with self._lock:
            return constraint in self._recent


def _reason(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    return _LOG_PREFIX.sub("", lines[0]).strip()  # drop "[hh:mm:ss] file.cc:123: "


def _check_schema(schema: Any) -> None:
    """Refuse what xgrammar would take minutes to compile, crash on or silently ignore (its output would then
    break the schema): objects with very many optional properties (:data:`MAX_OPTIONAL_PROPERTIES`), schemas
    too deep (counting the nesting that references add), too large, or with too many optional properties, enum
    values or references in all (the ``MAX_`` limits above); ``not``, ``allOf`` of several schemas,
    ``contains``, an empty ``anyOf``/``oneOf``, references outside the schema, and patterns xgrammar's regex
    parser refuses (lookarounds) or that are too long. Only the keywords that hold subschemas are followed
    (data such as ``example`` is not)."""
    stack, nodes, optional_total, enum_total, refs = [(schema, 1)], 0, 0, 0, 0
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict):
            continue
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH or nodes > MAX_SCHEMA_NODES:
            raise ValueError(f"json_schema: nested deeper than {MAX_SCHEMA_DEPTH} levels or larger than "
                             f"{MAX_SCHEMA_NODES} subschemas; simplify it")
        if isinstance(node.get("enum"), list):
            enum_total += len(node["enum"])
            if enum_total > MAX_ENUM_VALUES:
                raise ValueError(f"json_schema: more than {MAX_ENUM_VALUES} enum values in all")
        if "not" in node:
            raise ValueError("json_schema: 'not' is not supported")
        for key in ("contains", "minContains", "maxContains"):
            if key in node:
                raise ValueError(f"json_schema: {key!r} is not supported")
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            raise ValueError("json_schema: 'allOf' of more than one schema is not supported; merge them into one")
        for key in ("anyOf", "oneOf"):
            if node.get(key) == []:
                raise ValueError(f"json_schema: an empty {key!r} allows nothing")
        ref = node.get("$ref")
        if ref is not None:
            refs += 1
            if not isinstance(ref, str) or not ref.startswith("#"):
                raise ValueError(f"json_schema: only references within the schema ('#/...') are supported, got "
                                 f"{str(ref)[:80]!r}")
            if refs > MAX_REFS:
                raise ValueError(f"json_schema: more than {MAX_REFS} '$ref's")
        patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += list(node["patternProperties"])
        for pattern in patterns:
            _check_pattern(pattern)
        props = node.get("properties")
        if isinstance(props, dict):
            required = node.get("required")
            required = set(required) if isinstance(required, list) and all(isinstance(r, str) for r in required) \
                else set()
            optional = len(props.keys() - required)
            if optional > MAX_OPTIONAL_PROPERTIES:
                raise ValueError(f"json_schema: an object with {optional} optional properties; at most "
                                 f"{MAX_OPTIONAL_PROPERTIES} (their compilation time grows with the cube of "
                                 "their number): list some in 'required'")
            optional_total += optional
            if optional_total > MAX_OPTIONAL_TOTAL:
                raise ValueError(f"json_schema: more than {MAX_OPTIONAL_TOTAL} optional properties in all; list "
                                 "some in 'required'")
        stack.extend((child, depth + 1) for child in _children(node))
    if refs and _ref_depth(schema) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"json_schema: nested deeper than {MAX_SCHEMA_DEPTH} levels with its references expanded; "
                         "simplify it")


def _check_pattern(pattern: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"json_schema: a pattern of {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    depth = deepest = 0
    escaped = in_class = False
    for ch in pattern:  # group nesting (xgrammar's parsers recurse on it), outside character classes
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "()":
            depth += 1 if ch == "(" else -1
            deepest = max(deepest, depth)
    if deepest > MAX_PATTERN_DEPTH:
        raise ValueError(f"json_schema: a pattern with groups nested {deepest} deep; at most {MAX_PATTERN_DEPTH}")
    import xgrammar as xgr

    try:
        xgr.Grammar.from_regex(pattern)  # parsing only: what the schema's compilation would ignore or choke on
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"json_schema: pattern {pattern[:60]!r}: {_reason(exc)}") from None


def _ref_depth(schema: Any) -> int:
    """The deepest nesting of ``schema`` with each reference expanded in place (a recursive one counts once)."""
    memo: dict[str, int] = {}
    visiting: set[str] = set()

    def depth_of(pointer: str) -> int:
        if pointer in memo or pointer in visiting:
            return memo.get(pointer, 0)
        visiting.add(pointer)
        best, stack = 0, [(_resolve(schema, pointer), 1)]
        while stack:
            node, depth = stack.pop()
            if not isinstance(node, dict):
                continue
            best = max(best, depth)
            if isinstance(node.get("$ref"), str):
                best = max(best, depth - 1 + depth_of(node["$ref"]))
            stack.extend((child, depth + 1) for child in _children(node, definitions=False))
        visiting.discard(pointer)
        memo[pointer] = best
        return best

    return depth_of("#")


def _resolve(schema: Any, pointer: str) -> Any:
    node = schema
    for part in pointer.lstrip("#").split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _children(node: dict, definitions: bool = True) -> list:
    out = []
    for key, value in node.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            if definitions or key not in ("$defs", "definitions"):
                out.extend(value.values())  # name -> schema (a "dependencies" list of names is skipped)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out.extend(value)
        elif key in _SUBSCHEMA:
            out.append(value)
    return out


_SUBSCHEMA = ("items", "additionalProperties", "additionalItems", "contains", "propertyNames", "if", "then", "else",
              "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")


def new_matcher(compiled: Any, stop_tokens: list[int] | None = None) -> Any:
    """A matcher of ``compiled`` whose complete output ends with one of ``stop_tokens`` (the request's EOS ids:
    a chat model's end-of-turn token need not be its tokenizer's EOS, xgrammar's default)."""
    import xgrammar as xgr

    return xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_tokens) if stop_tokens else None)


class Masks:
    """A reusable token bitmask for the constrained rows of a step."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._buf: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, matchers: list[Any]) -> list[int]:
        """``logits[i]`` of every row ``i`` whose matcher is not None: forbidden tokens to -inf. Returns the
        rows whose matcher allows no token at all (a dead end: the constraint cannot be completed from there;
        their draw is meaningless, and the caller must not record it)."""
        import xgrammar as xgr

        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return []
        if self._buf is None or self._buf.shape[0] < len(matchers):
            self._buf = xgr.allocate_token_bitmask(max(len(matchers), 8), self.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(self._buf, i)
        allowed = self._buf[rows].any(dim=1).tolist()  # a complete grammar allows its stop token: never empty
        cpu = logits.device.type == "cpu"
        # to_device: pinned and non-blocking on CUDA, so neither copy waits for the queued forward (given a
        # list, xgrammar would copy the row indices from pageable memory, which may wait).
        xgr.apply_token_bitmask_inplace(logits, to_device(self._buf[: len(matchers)], logits.device),
                                        vocab_size=self.vocab_size, backend="cpu" if cpu else "auto",
                                        indices=rows if cpu else to_device(torch.tensor(rows, dtype=torch.int32),
                                                                           logits.device))
        return [i for i, ok in zip(rows, allowed) if not ok]


def _kind(seq: Any) -> str:
    """The request's own name for its constraint (``choices`` compile as a grammar)."""
    return next((k for k in KINDS if getattr(seq.params, k, None) is not None), "constraint")


def rejected_error(seq: Any, token: int) -> str:
    """Why ``seq``'s sampled ``token`` broke its constraint: the other settings removed every token its mask
    allowed (the engine then fails the sequence instead of recording the token)."""
    p, n = seq.params, seq.num_generated
    if n < p.min_new_tokens:
        why = (f"min_new_tokens={p.min_new_tokens} forbids ending after {n} tokens, and the constraint allows "
               "nothing but the end here")
    elif p.no_repeat_ngram_size > 0:
        why = f"no_repeat_ngram_size={p.no_repeat_ngram_size} likely banned every token the constraint allows here"
    else:
        why = "the grammar matcher rejected a token its mask allowed (an inconsistency in xgrammar)"
    return f"{_kind(seq)}: no token that follows the constraint could be sampled: {why} (sampled token {token})"


def dead_end_error(seq: Any) -> str:
    """Why ``seq`` (an engine Sequence) fails where its grammar allows no token at all."""
    return (f"{_kind(seq)}: no token can continue the output ({seq.num_generated} tokens so far): "
            "the constraint cannot be completed from there (an unsatisfiable schema or pattern, or text this "
            "tokenizer cannot spell)")
