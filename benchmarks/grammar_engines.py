"""xgrammar vs llguidance on this project's tokenizer: compile time, per-token mask time, and per-token
state advance, for the schema of serve_load.py's --constrained mode and a regex. The tokens followed are
those of a valid output (the same for both), so the masks are computed on the states a real generation
visits. Prints a markdown table.

    python benchmarks/grammar_engines.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import SCHEMA  # noqa: E402

OBJ = {"title": "A fine book", "rating": 4, "tags": ["novel", "french"], "author": {"name": "Jules Verne",
       "country": "FR"}, "summary": "A voyage under the sea, told by a professor."}
# Each engine's compact JSON: xgrammar (any_whitespace=False) writes ", " and ": ", llguidance
# (whitespace_flexible=False) "," and ":".
SAMPLE = {"xgrammar": json.dumps(OBJ), "llguidance": json.dumps(OBJ, separators=(",", ":"))}
REGEX, REGEX_SAMPLE = r"[A-Z]{3}-[0-9]{4}-(alpha|beta|gamma)", "ABC-1234-beta"


def run_xgrammar(tok, vocab: int, kind: str, spec: str, ids: list[int]) -> tuple[float, float, float]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t = time.perf_counter()
    g = comp.compile_json_schema(spec, any_whitespace=False) if kind == "json" else comp.compile_regex(spec)
    compile_s = time.perf_counter() - t
    m, bm = xgr.GrammarMatcher(g), xgr.allocate_token_bitmask(1, info.vocab_size)
    fill = adv = 0.0
    for i in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(bm)
        fill += time.perf_counter() - t
        t = time.perf_counter()
        assert m.accept_token(i)
        adv += time.perf_counter() - t
    return compile_s, fill / len(ids), adv / len(ids)


def run_llguidance(tok, vocab: int, kind: str, spec: str, ids: list[int]) -> tuple[float, float, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(spec, defaults={"whitespace_flexible": False}) \
        if kind == "json" else llguidance.LLMatcher.grammar_from_regex(spec)
    m = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t
    assert not m.is_error(), m.get_error()
    bm = lt.allocate_token_bitmask(1, vocab)
    fill = adv = 0.0
    for i in ids:
        t = time.perf_counter()
        lt.fill_next_token_bitmask(m, bm, 0)
        fill += time.perf_counter() - t
        t = time.perf_counter()
        assert m.consume_token(i), m.get_error()
        adv += time.perf_counter() - t
    return compile_s, fill / len(ids), adv / len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from hf_paged.models import _load_tokenizer, ensure_default_model

    tok = _load_tokenizer(ensure_default_model())
    vocab = len(tok)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    print("| engine | case | compile ms (median of rounds) | mask us/token | advance us/token | mask us/token, each round |")
    print("|---|---|---|---|---|---|")
    for kind, spec in (("json", json.dumps(SCHEMA)), ("regex", REGEX)):
        for name, fn in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance)):
            toks = ids(SAMPLE[name] if kind == "json" else REGEX_SAMPLE)
            rs = [fn(tok, vocab, kind, spec, toks) for _ in range(args.repeat)]
            med = [statistics.median(r[k] for r in rs) for k in range(3)]
            print(f"| {name} | {kind} ({len(toks)} tokens) | {med[0] * 1e3:.2f} | {med[1] * 1e6:.0f} | "
                  f"{med[2] * 1e6:.0f} | " + ", ".join(f"{r[1] * 1e6:.0f}" for r in rs) + " |")


if __name__ == "__main__":
    main()
