"""Fresh prefill: the wrapped model's forward over new prompts, contiguous-K/V path vs the paged path,
against the plain HF model with SDPA (contiguous K/V, no cache) as the baseline.

    python benchmarks/prefill.py [--device cuda] [--dtype bfloat16] [--prompts 4] [--length 512] [--rounds 3]

Default model (SmolLM2-135M) on CPU; on CUDA a random Llama-3.2-1B-shape model (nothing downloaded).
One forward of ``--prompts`` x ``--length`` tokens packed in one row (the engine's shape) per system,
interleaved rounds; reports each round, the median, the minimum and the ratio to SDPA (the issue's
target: within 1.3x of SDPA on contiguous K/V).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import hf_paged
from hf_paged import kernels
from hf_paged.kv.metadata import PagedMetadata


def build(device: str, dtype: torch.dtype):
    if device == "cpu":
        model, _ = hf_paged.load_default_model(dtype=dtype)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = build(args.device, dtype)
    n, length = args.prompts, args.length
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    flat = ids.reshape(1, -1).to(args.device)
    positions = torch.arange(length).repeat(n)[None].to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    # The baseline runs on its own copy: wrap() switches the model's attention to hf_paged's (its forwards
    # would go through the paged path too).
    plain = copy.deepcopy(model)
    assert plain.config._attn_implementation == "sdpa", plain.config._attn_implementation

    @torch.inference_mode()
    def sdpa() -> None:  # plain HF, padded batch of equal lengths: contiguous K/V, no cache
        plain(input_ids=ids.to(args.device), use_cache=False, logits_to_keep=1)

    hf_paged.wrap(model, num_blocks=n * (length // 16 + 1) + 8, block_size=16)
    pool = hf_paged.kv_pool(model)
    per = length // 16 + 1
    tables = [list(range(i * per, (i + 1) * per)) for i in range(n)]
    slots = [t[p // 16] * 16 + p % 16 for t in tables for p in range(length)]

    def paged(fresh: bool):
        @torch.inference_mode()
        def run() -> None:
            meta = PagedMetadata.build(pool, slots, tables, [length] * n, [length] * n, None)
            meta.fresh = fresh and meta.fresh
            keep = torch.tensor([(i + 1) * length - 1 for i in range(n)], device=args.device)
            model(input_ids=flat, position_ids=positions, paged_metadata=meta, use_cache=False, logits_to_keep=keep)
        return run

    systems = {"sdpa (plain HF)": sdpa, "hf_paged varlen": paged(True), "hf_paged paged": paged(False)}
    for fn in systems.values():  # warm-up
        fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in systems}
    for r in range(args.rounds):
        for name, fn in systems.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()), flush=True)
    base = statistics.median(times["sdpa (plain HF)"])
    print(f"\n{n} prompts x {length} tokens, {args.dtype} on {args.device}, backend "
          f"{kernels.resolve_backend('auto', flat.float())}")
    print("| system | rounds (ms) | median | min | median / SDPA |\n|---|---|---:|---:|---:|")
    for name, v in times.items():
        print(f"| {name} | {' / '.join(f'{x * 1e3:.1f}' for x in v)} | {statistics.median(v) * 1e3:.1f} | "
              f"{min(v) * 1e3:.1f} | {statistics.median(v) / base:.2f} |")
    hf_paged.unwrap(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
