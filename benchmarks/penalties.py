"""Repetition, frequency and presence penalties on CPU: each row's token list read every step (HF's
processor and a bincount, per row) vs the sampler's PenaltyState (each sequence's tokens kept as a growing
array, all rows penalised with one gather and one scatter).

    python benchmarks/penalties.py [--rounds 3] [--requests 32] [--max-new-tokens 64] [--out FILE.json]

1. The host sampler alone, ``[rows, 49152]`` random logits, histories of ``--history`` tokens (100 of them
   output), repetition_penalty 1.1 and frequency_penalty 0.2, greedy: ms per call at 16, 64 and 256 rows,
   lists and state interleaved; every call's tokens must agree.
2. End to end: PagedPipeline on the default model (fp32) generating for ``--requests`` chat requests with
   penalties, set A (greedy, repetition_penalty 1.1, frequency_penalty 0.2) and set B (other prompts;
   sampled at temperature 0.8 with a seed, top_k 50, presence_penalty 0.5, repetition_penalty 1.05), with
   the state off (token lists) and on, in interleaved rounds in one process; the tokens must be identical.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SETS = {"A": dict(repetition_penalty=1.1, frequency_penalty=0.2),
        "B": dict(do_sample=True, temperature=0.8, top_k=50, seed=3, presence_penalty=0.5, repetition_penalty=1.05)}


class Owner:
    finished = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--history", type=int, default=1124)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import hf_paged.engine.sampler as sampler_mod
    from hf_paged.engine.params import SamplingParams
    from hf_paged.engine.sampler import Sampler, SamplingRow

    real_tracked = sampler_mod.tracked

    def use_state(on: bool) -> None:
        sampler_mod.tracked = real_tracked if on else (lambda row: False)

    result: dict = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "micro": [], "e2e": []}

    # 1. the sampler alone
    vocab = 49152
    p = SamplingParams(max_new_tokens=10_000, repetition_penalty=1.1, frequency_penalty=0.2)
    for n in (16, 64, 256):
        rng = random.Random(n)
        logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(n))
        start = [[rng.randrange(vocab) for _ in range(args.history)] for _ in range(n)]
        runs = {name: (Sampler(vocab), [list(h) for h in start], [Owner() for _ in range(n)])
                for name in ("lists", "state")}
        per: dict[str, list[float]] = {"lists": [], "state": []}
        for r in range(args.rounds):
            for name in ("lists", "state") if r % 2 == 0 else ("state", "lists"):
                sampler, hist, owners = runs[name]
                use_state(name == "state")
                ts = []
                for _ in range(6):
                    rows = [SamplingRow(p, h, len(h) - args.history + 100, None, o) for h, o in zip(hist, owners)]
                    t = time.perf_counter()
                    out = sampler.sample(logits, rows)
                    ts.append(time.perf_counter() - t)
                    for h, tok in zip(hist, out.tokens):
                        h.append(tok)
                per[name].append(statistics.median(ts[1:]) * 1e3)  # the first call fills the state
        use_state(True)
        same = runs["lists"][1] == runs["state"][1]  # both started from the same histories and logits
        assert same, "the state changed the picks"
        result["micro"].append({"rows": n, "history": args.history,
                                **{f"{k}_ms": [round(v, 2) for v in vs] for k, vs in per.items()}})
        print(f"sampler, {n} rows x {vocab}, histories of {args.history}: lists "
              f"{statistics.median(per['lists']):.2f} ms (rounds {[round(v, 2) for v in per['lists']]}), state "
              f"{statistics.median(per['state']):.2f} ms (rounds {[round(v, 2) for v in per['state']]}); same picks",
              flush=True)

    # 2. end to end
    from transformers import AutoTokenizer

    from ab import ab_generate
    from hf_paged.engine.pipeline import PagedPipeline
    from hf_paged.models import ensure_default_model, load_model
    from throughput import build_prompts

    path = str(ensure_default_model())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model, _ = load_model(path, dtype=torch.float32)
    for which, setting in SETS.items():
        prompts = build_prompts(tok, args.requests, which)
        pipe = PagedPipeline(model, tok, kv_memory="1GiB", max_num_seqs=args.requests, max_batch_tokens=2048)
        pipe.generate(prompts[:2], max_new_tokens=4, progress=False)  # warm-up
        kw = dict(max_new_tokens=args.max_new_tokens, progress=False, **setting)
        tps, outs = ab_generate(pipe, prompts, kw, args.rounds,
                                {"lists": lambda: use_state(False), "state": lambda: use_state(True)})
        use_state(True)
        pipe.close()
        assert outs["lists"] == outs["state"], "the state changed the tokens"
        result["e2e"].append({"set": which, "setting": setting, "requests": args.requests,
                              "max_new_tokens": args.max_new_tokens,
                              **{f"{k}_tok_s": [round(v, 1) for v in vs] for k, vs in tps.items()}})
        print(f"e2e set {which} {setting}: lists {statistics.median(tps['lists']):.1f} tok/s (rounds "
              f"{[round(v, 1) for v in tps['lists']]}), state {statistics.median(tps['state']):.1f} tok/s (rounds "
              f"{[round(v, 1) for v in tps['state']]}); same tokens", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
