"""KV memory held by HF's DynamicCache (padded batch) vs hf_paged's PagedKVCache, same requests.

    python benchmarks/memory.py [--model default|PATH] [--requests 16] [--block-size 16] [--new 32]

Both caches are measured after a real greedy ``generate()`` of the same left-padded batch: HF's
tensors' bytes vs the blocks the paged cache holds. Waste = allocated-but-unused slots / allocated.
"""
from __future__ import annotations

import argparse
import json
import random

import torch

import hf_paged
from hf_paged.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=600)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(args.requests)]
    width = max(lengths)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros_like(ids)
    g = torch.Generator().manual_seed(args.seed)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(10, tok.vocab_size, (n,), generator=g)
        mask[i, width - n:] = 1
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
               do_sample=False, return_dict_in_generate=True)

    out = model.generate(**gen)
    hf_cache = out.past_key_values
    hf_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in hf_cache.layers)
    per_token = hf_bytes // (len(lengths) * hf_cache.get_seq_length())
    stored = args.new - 1  # the last generated token is never fed back
    used_tokens = sum(n + stored for n in lengths)

    hf_paged.wrap(model, block_size=args.block_size, kv_memory=2 * hf_bytes)
    cache = hf_paged.PagedKVCache(hf_paged.kv_pool(model))
    paged = model.generate(**gen, past_key_values=cache)
    same = torch.equal(paged.sequences, out.sequences)
    blocks = cache.num_blocks_held
    paged_bytes = blocks * args.block_size * per_token
    assert sum(t.num_tokens for t in cache.tables) == used_tokens
    cache.release()

    rows = {
        "requests": len(lengths), "prompt_lengths": f"{min(lengths)}..{max(lengths)}",
        "new_tokens": args.new, "block_size": args.block_size, "kv_bytes_per_token": per_token,
        "hf_dynamic_cache_bytes": hf_bytes, "paged_bytes": paged_bytes,
        "hf_waste": 1 - used_tokens * per_token / hf_bytes, "paged_waste": 1 - used_tokens * per_token / paged_bytes,
        "paged_vs_hf": paged_bytes / hf_bytes, "greedy_tokens_identical": same,
    }
    print("| cache | KV MiB | waste |\n|---|---|---|")
    print(f"| HF DynamicCache (left-padded) | {hf_bytes / 2**20:.1f} | {rows['hf_waste']:.1%} |")
    print(f"| hf_paged PagedKVCache (block {args.block_size}) | {paged_bytes / 2**20:.1f} | {rows['paged_waste']:.1%} |")
    print(f"paged / HF bytes: {rows['paged_vs_hf']:.3f}; greedy tokens identical: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
