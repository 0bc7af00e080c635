"""Randomised differential runs of the engine: one request set, many engine shapes, the same outputs.

A scenario is a random set of requests (shared prompt prefixes, greedy and seeded sampled rows with every
warper, penalties, n-gram bans, min_new_tokens, logprobs and top lists, n > 1, stop strings, length limits;
with a real tokenizer also regex, choice and JSON schema constraints, one of which cannot be completed)
and a random set of engine shapes: the overlapped loop and async scheduling, a KV pool small enough to
preempt, chunked prefill, block sizes, prefix caching, the fused greedy head, consumers that cancel. Every
shape must give the reference shape's tokens, texts and finish reasons (a seeded row samples from its own
generator, so its tokens do not depend on the batch, up to the float rounding that batch shapes change: see
fuzz_models.rounding_flip), logprobs to float noise, and free every block; the reference's greedy requests
must equal HF ``generate()``.

    python tests/engine_fuzz.py --seeds 50 [--first 0] [--arch llama]   # a long run; test_engine_fuzz runs a few
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if os.environ.get("HF_PAGED_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_paged  # noqa: E402
from hf_paged.engine import runner as runner_mod  # noqa: E402
from hf_paged.engine.pipeline import PagedPipeline  # noqa: E402
from fuzz_models import LoraTarget, chat_model, hf_parity, rounding_flip  # noqa: E402
from tiny_models import VOCAB, IdTokenizer, load  # noqa: E402

# The reference: everything at once, nothing shared, no loop tricks.
REFERENCE = dict(overlap=False, async_scheduling=False, max_num_seqs=64, max_batch_tokens=4096, num_blocks=2048,
                 block_size=16, enable_prefix_caching=False)


def requests(rng: random.Random, n: int, tok=None, adapters: list[str] | None = None) -> list[tuple[list[int], dict]]:
    """``n`` random (prompt ids, submit kwargs). A third of the prompts share one of three prefixes. ``tok``: a
    real tokenizer (its stop strings are bits of its tokens' text), else :class:`IdTokenizer`'s ids. ``adapters``:
    LoRA adapter names, one (or none) picked per request."""
    vocab = len(tok) if tok is not None else VOCAB
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 40))] for _ in range(3)]
    out = []
    for i in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))]
        if rng.random() < 0.35:
            ids = rng.choice(prefixes) + ids[: rng.randint(0, 12)]
        kw: dict = dict(max_new_tokens=rng.randint(1, 40), seed=rng.randrange(1000))
        if rng.random() < 0.5:
            kw.update(do_sample=True, temperature=rng.choice([0.5, 0.8, 1.0, 1.3]), top_k=rng.choice([0, 0, 5, 50]))
            if rng.random() < 0.4:
                kw["top_p"] = rng.choice([0.5, 0.9, 0.97])
            if rng.random() < 0.15:
                kw["min_p"] = rng.choice([0.02, 0.1])
            if rng.random() < 0.15:
                kw["typical_p"] = rng.choice([0.6, 0.95])
            if rng.random() < 0.25:
                kw["num_return_sequences"] = rng.randint(2, 3)
        if rng.random() < 0.2:
            kw["repetition_penalty"] = rng.choice([0.9, 1.2])
        if rng.random() < 0.2:
            kw.update(frequency_penalty=rng.choice([-0.5, 0.4]), presence_penalty=rng.choice([0.0, 0.6]))
        if rng.random() < 0.1:
            kw["no_repeat_ngram_size"] = rng.randint(1, 3)
        if rng.random() < 0.15:
            kw["min_new_tokens"] = rng.randint(0, kw["max_new_tokens"])
        if rng.random() < 0.3:
            kw["ignore_eos"] = True
        if rng.random() < 0.3:
            kw["logprobs"] = True
        if rng.random() < 0.15:
            kw["top_logprobs"] = rng.randint(1, 5)
        if rng.random() < 0.08:
            kw["prompt_logprobs"] = rng.randint(0, 3)
        if adapters:
            kw["adapter"] = rng.choice([None, *adapters])
        if tok is not None and rng.random() < 0.15:  # xgrammar needs a real tokenizer
            kind, value = rng.choice(CONSTRAINTS)
            kw[kind] = value
        if rng.random() < 0.1:
            if tok is None:
                kw["stop"] = [str(rng.randrange(3, vocab))]  # IdTokenizer's text is the ids, space-separated
            else:  # one or two characters of a token's text (a byte-level vocabulary: often not a whole one)
                text = tok.decode([rng.randrange(3, vocab)]).strip() or "e"
                start = rng.randrange(len(text))
                kw["stop"] = [text[start:start + rng.randint(1, 2)]]
        out.append((ids, kw))
    return out


# Constraints of the 'chat' scenarios (the last one has no way on after "a": its request fails, closed).
CONSTRAINTS = [("regex", "[0-9]{1,4}"), ("regex", "(yes|no)!"), ("regex", "[a-z]{2,5}( [a-z]{2,5}){0,2}\\."),
               ("choices", ["red", "green", "blue sky", "naïve"]),
               ("json_schema", {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                 "b": {"type": "string", "maxLength": 6}},
                                "required": ["a", "b"]}),
               ("regex", "a[^\\x00-\\U0010FFFF]")]


def follows(kind: str, value, text: str) -> bool:
    """Whether ``text`` is a complete output of the constraint."""
    import json
    import re

    if kind == "regex":
        return re.fullmatch(value, text) is not None
    if kind == "choices":
        return text in value
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == {"a", "b"} and isinstance(obj["a"], int) and 0 <= obj["a"] <= 99 \
        and isinstance(obj["b"], str) and len(obj["b"]) <= 6


def shapes(rng: random.Random, k: int, n_requests: int) -> list[dict]:
    """``k`` random engine shapes (each differs from the reference in several ways at once)."""
    out = []
    for _ in range(k):
        block = rng.choice([4, 8, 16])
        small = rng.random() < 0.5
        out.append(dict(
            overlap=rng.random() < 0.5, async_scheduling=rng.random() < 0.5,
            max_num_seqs=rng.choice([2, 5, 16, 64]), max_batch_tokens=rng.choice([16, 48, 256, 4096]),
            block_size=block, num_blocks=rng.randint(30, 60) * 16 // block if small else 2048,
            enable_prefix_caching=rng.random() < 0.7, fused_head=rng.random() < 0.5,
            # Requests cancelled by their consumer after this many events (0: at once).
            cancel={i: rng.randint(0, 6) for i in range(n_requests) if rng.random() < 0.15}))
    return out


def run(model, reqs, shape: dict, tok=None) -> tuple[list, int, list[str]]:
    """The outputs of ``reqs`` on an engine of ``shape``, the blocks it left used and what :func:`invariants` found.
    ``model``: a model, or a :class:`LoraTarget` (each run then loads its base model afresh)."""
    shape = dict(shape)
    fused = shape.pop("fused_head", True)
    cancel = shape.pop("cancel", {})
    old = os.environ.get("HF_PAGED_FUSED_HEAD")
    os.environ["HF_PAGED_FUSED_HEAD"] = "1" if fused else "0"
    try:
        if isinstance(model, LoraTarget):
            shape["lora_adapters"] = model.dirs
            model = load(model.base_path)
        pipe = PagedPipeline(model, tok if tok is not None else IdTokenizer(), **shape)
    finally:
        if old is None:
            os.environ.pop("HF_PAGED_FUSED_HEAD")
        else:
            os.environ["HF_PAGED_FUSED_HEAD"] = old
    rows = runner_mod.FUSED_HEAD_MIN_ROWS
    runner_mod.FUSED_HEAD_MIN_ROWS = 1  # where it is on, from one greedy row (the requests here are few)
    try:
        # All queued at once (submit() one by one would let the first steps start with some of them, at
        # times that vary from run to run), so each shape's steps are the same in every run.
        handles = pipe._enqueue([pipe._make_request(ids, kw) for ids, kw in reqs])
        streamed: list[list] = [[] for _ in handles]

        def consume(i: int) -> None:  # every event, as a thread consumer reads them; cancels if asked
            if cancel.get(i) == 0:
                handles[i].cancel()
            for ev in handles[i]:
                streamed[i].append(ev)
                if len(streamed[i]) == cancel.get(i):
                    handles[i].cancel()

        threads = [threading.Thread(target=consume, args=(i,)) for i in cancel]
        for t in threads:
            t.start()
        for i in range(len(handles)):
            if i not in cancel:
                consume(i)
        for t in threads:
            t.join(600)
        out = [ev[-1].output for ev in streamed]  # a failed request's too (result() would raise)
        used = pipe.stats()["blocks_used"]
        problems = [f"request {i}: {p}" for i, (ev, r, (_, kw)) in enumerate(zip(streamed, out, reqs))
                    for p in invariants(ev, r, kw, tok)]
    finally:
        runner_mod.FUSED_HEAD_MIN_ROWS = rows
        pipe.close()
        hf_paged.unwrap(model)
    return [[(o.token_ids, o.text, str(o.finish_reason), o.logprobs, o.top_logprobs, r.prompt_logprobs)
             for o in r.outputs] for r in out], used, problems


def invariants(events: list, result, kw: dict, tok=None) -> list[str]:
    """What is wrong with one request's events and output on their own: each continuation's streamed tokens
    and text are its output's, its text decodes its tokens (up to a stop string), only the last event
    carries the output, a constrained output that ended on its own follows its constraint, and only a
    constraint that cannot go on fails a request."""
    problems = []
    finals = [k for k, ev in enumerate(events) if ev.output is not None]
    if finals != [len(events) - 1]:
        problems.append(f"the output came with events {finals} of {len(events)}")
    kind = next((k for k in ("regex", "choices", "json_schema") if k in kw), None)
    if result.error is not None and not (kind == "regex" and kw[kind] == CONSTRAINTS[-1][1]
                                         and "cannot be completed" in result.error) \
            and not (kind is not None and ("min_new_tokens=" in result.error or "no_repeat_ngram" in result.error)):
        problems.append(f"failed: {result.error}")  # a constraint against min_new_tokens or n-gram bans may fail
    for o in result.outputs:
        if kind is not None and o.finish_reason == "stop" and o.stop_string is None \
                and not follows(kind, kw[kind], o.text):
            problems.append(f"output {o.index}: {o.text!r} does not follow {kind} {kw[kind]}")
        mine = [ev for ev in events if ev.index == o.index and ev.output is None]
        toks = [ev.token_id for ev in mine if ev.token_id is not None]
        if toks != o.token_ids:
            problems.append(f"output {o.index}: streamed tokens {toks} vs {o.token_ids}")
        if "".join(ev.text for ev in mine) != o.text:
            problems.append(f"output {o.index}: streamed text {''.join(ev.text for ev in mine)!r} vs {o.text!r}")
        full = (tok if tok is not None else IdTokenizer()).decode(o.token_ids, skip_special_tokens=True)
        if o.text != full and not (o.stop_string is not None and full.startswith(o.text)):
            problems.append(f"output {o.index}: text {o.text!r} is not its tokens' {full!r}")
    return problems


def compare(ref: list, got: list, reqs, shape: dict, model=None, flips: list | None = None) -> list[str]:
    """What differs between two runs' outputs (empty: the same). With ``model``, a token that differs where the
    draw changes with float noise alone (:func:`rounding_flip`) is a rounding
    flip, not a problem: that continuation is compared up to it, and the flip is noted in ``flips``."""
    problems = []
    for i, (ra, rb) in enumerate(zip(ref, got)):
        for j, (a, b) in enumerate(zip(ra, rb)):
            k = next((t for t, (x, y) in enumerate(zip(a[0], b[0])) if x != y), None)
            if k is not None and model is not None:
                if rounding_flip(model, reqs[i], j, a[0][:k], a[0][k], b[0][k]):
                    if flips is not None:
                        flips.append(f"request {i}.{j} token {k}: {a[0][k]} vs {b[0][k]}")
                    continue
            if b[2] == "cancelled" and a[2] != "cancelled":  # ended early: a prefix of the full run's tokens
                if b[0] != a[0][: len(b[0])]:
                    problems.append(f"request {i}.{j}: cancelled after {len(b[0])} tokens, not a prefix: "
                                    f"{b[0][:8]} vs {a[0][:8]}")
                continue
            if a[2] == "error" and b[2] == "error":  # a sibling's failure ends it wherever it is: prefixes
                short, long = sorted((a[0], b[0]), key=len)
                if long[: len(short)] != short:
                    problems.append(f"request {i}.{j}: failed in both runs, tokens differ: {a[0][:8]} vs {b[0][:8]}")
                continue
            if a[:3] != b[:3]:
                k = k if k is not None else min(len(a[0]), len(b[0]))
                problems.append(f"request {i}.{j} {reqs[i][1]} prompt {len(reqs[i][0])} tokens: differs from "
                                f"token {k}: {a[0][k:k + 4]} ({a[2]}) vs {b[0][k:k + 4]} ({b[2]})")
                continue
            for x, y in ((a[3], b[3]), (a[4], b[4])):
                if (x is None) != (y is None):
                    problems.append(f"request {i}.{j}: logprobs given in one run only")
            if a[3] is not None and b[3] is not None and any(abs(p - q) > 1e-3 for p, q in zip(a[3], b[3])):
                problems.append(f"request {i}.{j}: logprobs differ: {a[3][:4]} vs {b[3][:4]}")
            if _prompt_logprobs_differ(a[5], b[5]):
                problems.append(f"request {i}.{j}: prompt logprobs differ")
            if a[4] is not None and b[4] is not None:
                ids_a = [[t for t, _ in step] for step in a[4]]
                ids_b = [[t for t, _ in step] for step in b[4]]
                if len(ids_a) != len(ids_b) or any(
                        len(p) != len(q) or abs(u - v) > 1e-3
                        for sa, sb in zip(a[4], b[4]) for p, q in [(sa, sb)] for (_, u), (_, v) in zip(p, q)):
                    problems.append(f"request {i}.{j}: top logprobs differ: {a[4][:2]} vs {b[4][:2]}")
                elif ids_a != ids_b and not _near_ties(a[4], b[4]):
                    problems.append(f"request {i}.{j}: top logprob ids differ: {ids_a[:3]} vs {ids_b[:3]}")
    return problems


def _prompt_logprobs_differ(a, b) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    return len(a) != len(b) or any((x is None) != (y is None) or (
        x is not None and (abs(x[0] - y[0]) > 1e-3 or len(x[1]) != len(y[1]))) for x, y in zip(a, b))


def _near_ties(a, b) -> bool:
    """Top lists whose ids differ only where two alternatives' logprobs are within float noise."""
    for sa, sb in zip(a, b):
        for (ta, va), (tb, vb) in zip(sa, sb):
            if ta != tb and abs(va - vb) > 1e-4:
                return False
    return True


def scenario(model, seed: int, n_requests: int = 14, n_shapes: int = 3, tok=None,
             flips: list | None = None) -> list[str]:
    """One scenario: returns the problems found (empty when every shape matched the reference). ``tok``: the
    model's real tokenizer (default: the tiny models' :class:`IdTokenizer`)."""
    rng = random.Random(seed)
    reqs = requests(rng, n_requests, tok, list(model.dirs) if isinstance(model, LoraTarget) else None)
    ref, used, found = run(model, reqs, REFERENCE, tok)
    problems = [f"seed {seed} reference: {p}" for p in found]
    if used:
        problems.append(f"seed {seed} reference: {used} blocks still used")
    problems += [f"seed {seed} against generate(): {p}" for p in hf_parity(model, reqs, ref, flips)]
    for shape in shapes(rng, n_shapes, n_requests):
        got, used, found = run(model, reqs, dict(REFERENCE, **shape), tok)
        found += compare(ref, got, reqs, shape, model, flips)
        if used:
            found.append(f"{used} blocks still used")
        problems += [f"seed {seed} shape {shape}: {p}" for p in found]
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--arch", default="llama", help="a tiny model of tests/tiny_models.py, 'chat': a tiny Llama "
                    "with the default model's tokenizer (real text: byte-level tokens, multi-byte characters), or "
                    "'lora': the tiny Llama with three LoRA adapters, picked per request")
    ap.add_argument("--requests", type=int, default=14)
    ap.add_argument("--shapes", type=int, default=3)
    args = ap.parse_args()
    import tempfile

    from tiny_models import build

    tok = None
    if args.arch == "chat":
        model, tok = chat_model()
    elif args.arch == "lora":
        model = LoraTarget(Path(tempfile.mkdtemp()))
    else:
        model = load(build(args.arch, Path(tempfile.mkdtemp())))
    bad = 0
    for seed in range(args.first, args.first + args.seeds):
        t = time.time()
        flips: list[str] = []
        problems = scenario(model, seed, args.requests, args.shapes, tok, flips)
        for f in flips:
            print(f"    seed {seed}: rounding flip (not a problem): {f}", flush=True)
        bad += bool(problems)
        print(f"seed {seed}: {'OK' if not problems else f'{len(problems)} problem(s)'} ({time.time() - t:.1f} s)",
              flush=True)
        for p in problems[:6]:
            print("   ", p, flush=True)
    print(f"{bad} of {args.seeds} scenarios differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
