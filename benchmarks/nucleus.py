"""Top-p (nucleus) and typical-p sampling on CPU: HF's TopPLogitsWarper / TypicalLogitsWarper (a sort of
every row) vs the sampler's ``nucleus`` / ``typical`` (candidates from topk, then bins; HF's sort only
where the decision is not clear of HF's rounding).

    python benchmarks/nucleus.py [--warper top_p|typical] [--rounds 3] [--requests 16] [--max-new-tokens 64]
                                 [--stress 60] [--out FILE.json]

0. Exactness: ``--stress`` batches of 16 random rows (near-uniform to peaked, three vocabularies, five
   settings), each compared with HF's warper; any difference fails the run.
1. On real logits of the default model: the next-token logits of sampled chat replies (set A and set B
   prompts), scaled by the temperature, in batches of 1, 16 and 64 rows: time per call and the rows that
   fell back to the sort. Both must return the same tensor (checked on every row).
2. End to end: PagedPipeline generating for 16 chat requests as an OpenAI client sends them (no top_k,
   a seed; top_p: set A at temperature 0.7 and top_p 0.9, set B at 1.0 and 0.95; typical: set A at 0.7
   and typical_p 0.9, set B at 1.0 and 0.95), with the new path off (base) and on (new), in interleaved
   rounds in one process; the tokens must be identical.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SETTINGS = {"top_p": (("A", 0.7, 0.9), ("B", 1.0, 0.95)), "typical": (("A", 0.7, 0.9), ("B", 1.0, 0.95))}


def chat_prompts(tok, which: str, n: int) -> list[list[int]]:
    from throughput import build_prompts

    return build_prompts(tok, n, which)


def real_logits(model, tok, prompts: list[list[int]], steps: int, temperature: float, top_p: float) -> torch.Tensor:
    """Raw next-token logits of ``steps`` sampled tokens of each prompt (generate, left-padded batch)."""
    width = max(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                         top_p=top_p, max_new_tokens=steps, min_new_tokens=steps, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=pad)
    return torch.cat(list(out.logits), dim=0).float()  # [steps * len(prompts), vocab]


class Pair:
    """HF's warper and ours for one setting name, with a count of the rows ours left to HF's."""

    def __init__(self, warper: str):
        import hf_paged.engine.warpers as warpers
        from transformers.generation import logits_process as lp

        self.mod, self.name = warpers, ("TopPLogitsWarper" if warper == "top_p" else "TypicalLogitsWarper")
        self.hf_cls = getattr(lp, self.name)
        self.ours = warpers.nucleus if warper == "top_p" else warpers.typical
        # what ours calls for the rows it leaves to HF's sort: HF's TopP warper, or typical's HF tail
        self.hook = "TopPLogitsWarper" if warper == "top_p" else "_typical_sorted"
        self.real = getattr(warpers, self.hook)
        self.fell = 0
        pair = self
        if self.hook == "_typical_sorted":
            def counting(rows, *a):
                pair.fell += rows.shape[0]
                return pair.real(rows, *a)
        else:
            class Counting(self.real):
                def __call__(self, input_ids, scores):
                    pair.fell += scores.shape[0]
                    return super().__call__(input_ids, scores)
            counting = Counting
        self.counting = counting

    def hf(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return self.hf_cls(p)(torch.empty(1, 0, dtype=torch.long), x)

    def new(self, x: torch.Tensor, p: float, count: bool = False) -> torch.Tensor:
        setattr(self.mod, self.hook, self.counting if count else self.real)
        try:
            return self.ours(x, p)
        finally:
            setattr(self.mod, self.hook, self.real)


def stress(pair: Pair, batches: int) -> tuple[int, int, int]:
    """Ours against HF's warper on random rows (Gaussian and Gumbel scores, near-uniform to peaked,
    vocabularies 1000 / 49152 / 151936, settings 0.5..0.99): (rows, rows that differ, rows HF's sort decided)."""
    g = torch.Generator().manual_seed(123)
    pair.fell = 0
    rows = bad = 0
    for trial in range(batches):
        vocab = (1000, 49152, 151936)[trial % 3]
        scale = (0.02, 0.3, 1.0, 1.7, 2.5, 4.0, 8.0, 15.0)[trial % 8]
        x = torch.randn(16, vocab, generator=g) * scale
        if trial % 5 == 0:
            x = x + torch.randn(16, 1, generator=g)
        if trial % 7 == 0:
            x = -torch.log(-torch.log(torch.rand(16, vocab, generator=g))) * scale  # Gumbel
        for p in (0.5, 0.8, 0.9, 0.95, 0.99):
            got, want = pair.new(x, p, count=True), pair.hf(x, p)
            rows += 16
            bad += int((got.isinf() != want.isinf()).any(dim=-1).sum())
    return rows, bad, pair.fell


def time_call(fn, reps: int = 5) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warper", choices=sorted(SETTINGS), default="top_p")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stress", type=int, default=60, help="batches of 16 random rows checked against HF first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    import hf_paged.engine.warpers as warpers
    from ab import ab_generate
    from hf_paged.engine.pipeline import PagedPipeline
    from hf_paged.models import ensure_default_model, load_model

    path = str(ensure_default_model())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model, _ = load_model(path, dtype=torch.float32)
    pair = Pair(args.warper)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "warper": args.warper, "threads": args.threads,
                    "micro": [], "e2e": []}

    # 0. exactness on random rows
    rows, bad, fell = stress(pair, args.stress)
    result["stress"] = {"rows": rows, "differing_rows": bad, "rows_sorted_by_hf": fell}
    print(f"random rows: {rows} checked, {bad} differ from {pair.name}, {fell} left to HF's sort", flush=True)
    assert bad == 0

    # 1. real logits
    for which, temperature, p in SETTINGS[args.warper]:
        # (the replies are sampled with top_p = the setting, for either warper)
        rows = real_logits(model, tok, chat_prompts(tok, which, 8), 32, temperature, p) / temperature
        pair.fell = 0
        for i in range(rows.shape[0]):
            assert torch.equal(pair.new(rows[i:i + 1], p, count=True), pair.hf(rows[i:i + 1], p))
        fallback = pair.fell / rows.shape[0]
        for batch in (1, 16, 64):
            x = rows[:batch]
            per = {"hf": [], "new": []}
            for _ in range(args.rounds):
                per["hf"].append(time_call(lambda: pair.hf(x, p)) * 1e3)
                per["new"].append(time_call(lambda: pair.new(x, p)) * 1e3)
            entry = {"set": which, "temperature": temperature, args.warper: p, "rows": batch,
                     "fallback_fraction": round(fallback, 3),
                     **{f"{k}_ms": [round(v, 3) for v in vs] for k, vs in per.items()}}
            result["micro"].append(entry)
            print(f"set {which} T={temperature} {args.warper}={p} rows={batch}: HF "
                  f"{statistics.median(per['hf']):.2f} ms (min {min(per['hf']):.2f}), new "
                  f"{statistics.median(per['new']):.2f} ms (min {min(per['new']):.2f}); rows sorted "
                  f"{fallback:.1%}", flush=True)

    # 2. end to end, base and new interleaved
    for which, temperature, p in SETTINGS[args.warper]:
        prompts = chat_prompts(tok, which, args.requests)
        pipe = PagedPipeline(model, tok, kv_memory="1GiB", max_num_seqs=args.requests, max_batch_tokens=2048)
        pipe.generate(prompts[:2], max_new_tokens=4, progress=False)  # warm-up
        setting = {"top_p": p} if args.warper == "top_p" else {"typical_p": p}
        kw = dict(do_sample=True, temperature=temperature, top_k=0, seed=1, max_new_tokens=args.max_new_tokens,
                  progress=False, **setting)
        def candidates(n: int):
            return lambda: setattr(warpers, "NUCLEUS_CANDIDATES", n)

        tps, outs = ab_generate(pipe, prompts, kw, args.rounds, {"base": candidates(0), "new": candidates(64)})
        pipe.close()
        assert outs["base"] == outs["new"], "the new path changed the sampled tokens"
        result["e2e"].append({"set": which, "temperature": temperature, args.warper: p, "requests": args.requests,
                              "max_new_tokens": args.max_new_tokens,
                              **{f"{k}_tok_s": [round(v, 1) for v in vs] for k, vs in tps.items()}})
        print(f"e2e set {which} T={temperature} {args.warper}={p}: base {statistics.median(tps['base']):.1f} tok/s "
              f"(rounds {[round(v, 1) for v in tps['base']]}), new {statistics.median(tps['new']):.1f} tok/s (rounds "
              f"{[round(v, 1) for v in tps['new']]}); same tokens", flush=True)
    warpers.NUCLEUS_CANDIDATES = 64
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
