"""Throughput with many LoRA adapters in one batch against the same run with none.

The default model (SmolLM2-135M-Instruct) with N random rank-R adapters on every projection
(q/k/v/o/gate/up/down, ``init_lora_weights=False`` so they change the output); the requests are
spread round-robin over the base model and the adapters. The same requests run on a second pipeline
whose model has no adapter (today's path), in interleaved rounds, in one process. Fixed output
lengths (``ignore_eos``) so that both runs generate the same number of tokens.

    python benchmarks/lora_throughput.py --rounds 3                   # set A: benchmarks/chat_requests.py
    python benchmarks/lora_throughput.py --rounds 3 --set B           # set B: other prompts and lengths
    python benchmarks/lora_throughput.py --dry-run                    # 2 layers' worth, seconds (tested)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def requests(tok, which: str, n: int, max_new: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_new_tokens) of set A (the chat benchmark's prompts) or set B (other prompts,
    other lengths: short completions and long summaries)."""
    if which == "A":
        from chat_requests import chats

        prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in chats()]
        prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
        return [(prompts[i % len(prompts)], max_new) for i in range(n)]
    rng = random.Random(1)
    words = ("river market engine garden signal orbit ledger canvas harbor voltage pepper lantern "
             "quartz meadow cipher timber").split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 400)))
        msgs = [{"role": "user", "content": f"Summarise in one paragraph: {text}"}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append((list(ids["input_ids"] if hasattr(ids, "keys") else ids), rng.choice([16, 48, 96, 160])))
    return out


def make_adapters(model, root: Path, n: int, rank: int) -> dict[str, str]:
    import peft

    dirs = {}
    for i in range(n):
        torch.manual_seed(1000 + i)
        shell = type(model)(model.config)
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        peft.get_peft_model(shell, cfg).save_pretrained(root / f"lora{i}")
        dirs[f"lora{i}"] = str(root / f"lora{i}")
    return dirs


def run(pipe, reqs, adapters: list[str | None]) -> tuple[float, int]:
    t0 = time.perf_counter()
    handles = [pipe.submit(ids, adapter=adapters[i % len(adapters)], max_new_tokens=m, do_sample=False,
                           ignore_eos=True) for i, (ids, m) in enumerate(reqs)]
    tokens = sum(len(h.result().token_ids) for h in handles)
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["A", "B"], default="A")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="set A's output length")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-memory", default="1GiB")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="both pipelines without prefix caching (set A's chats share prefixes, which requests "
                         "on different adapters cannot share)")
    ap.add_argument("--dry-run", action="store_true", help="a 2-layer model, 8 requests, 1 round")
    ap.add_argument("--json", default=None, help="write the rounds here")
    args = ap.parse_args()

    import hf_paged

    def load():
        model, tok = hf_paged.load_default_model()
        if args.dry_run:
            model.model.layers = model.model.layers[:2]
            model.config.num_hidden_layers = 2
        return model, tok

    if args.dry_run:
        args.rounds, args.num_requests, args.max_new_tokens = 1, 8, 8
    base_model, tok = load()
    lora_model, _ = load()
    reqs = requests(tok, args.set, args.num_requests, args.max_new_tokens)
    if args.dry_run:
        reqs = [(ids[:64], min(m, 8)) for ids, m in reqs]
    opts = dict(kv_memory=args.kv_memory, max_num_seqs=args.max_num_seqs,
                enable_prefix_caching=not args.no_prefix_cache)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(lora_model, Path(tmp), args.adapters, args.rank)
        plain = hf_paged.PagedPipeline(base_model, tok, **opts)
        lora = hf_paged.PagedPipeline(lora_model, tok, lora_adapters=dirs, **opts)
        spread = [None, *dirs]  # the base model and each adapter in turn
        run(plain, reqs[:4], [None])  # warm both (kernels built, threads started)
        run(lora, reqs[:4], spread)
        rounds = []
        for r in range(args.rounds):
            order = [("none", plain, [None]), ("lora", lora, spread)]
            if r % 2:
                order.reverse()
            row = {}
            for name, pipe, adapters in order:
                pipe.pool.allocator.reset_prefix_cache()
                secs, toks = run(pipe, reqs, adapters)
                row[name] = toks / secs
            row["ratio"] = row["lora"] / row["none"]
            rounds.append(row)
            print(f"round {r + 1}: no adapters {row['none']:.1f} tok/s, {args.adapters} adapters "
                  f"{row['lora']:.1f} tok/s, ratio {row['ratio']:.3f}", flush=True)
        plain.close()
        lora.close()
    ratios = [r["ratio"] for r in rounds]
    label = f"set {args.set}" + (" (no prefix cache)" if args.no_prefix_cache else "")
    print(f"{label}: ratio median {statistics.median(ratios):.3f}, min {min(ratios):.3f} "
          f"({args.num_requests} requests, {args.adapters} adapters of rank {args.rank}, torch threads "
          f"{torch.get_num_threads()})")
    if args.json:
        Path(args.json).write_text(json.dumps({"set": args.set, "adapters": args.adapters, "rank": args.rank,
                                               "prefix_cache": not args.no_prefix_cache, "rounds": rounds},
                                              indent=1))


if __name__ == "__main__":
    main()
