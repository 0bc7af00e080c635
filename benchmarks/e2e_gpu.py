"""End to end on CUDA: greedy ``generate`` of a random-weight ~1B Llama, plain HF vs ``hf_paged.wrap``.

    python benchmarks/e2e_gpu.py [--out results/e2e.json] [--batch 8] [--prompt-len 128] [--new 128]

The model is built from a LlamaConfig (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate
5632, vocab 32000) in fp16 with random weights, so nothing is downloaded. Both runs get the same
random prompts (no padding) and generate exactly ``--new`` tokens (no EOS). Each is warmed up once
(Triton compiles on first use) and then timed. Reports tokens/s of both, their ratio, and whether the
tokens agree; on a mismatch it also reports the baseline's top-2 logit margin at the first differing
step, since random weights make near-ties (and so fp16 rounding flips) common.
Without CUDA it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: CPU init of 1B parameters is slow
        model = LlamaForCausalLM(config)
    model = model.half().eval()
    model.generation_config.eos_token_id = None  # always generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def timed_generate(model, input_ids, new_tokens: int) -> tuple[torch.Tensor, float]:
    mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
    return out[:, input_ids.shape[1]:], time.perf_counter() - start


def first_mismatch(model, input_ids, base: torch.Tensor, paged: torch.Tensor, new_tokens: int) -> dict:
    """Where the two generations first differ, and how close the baseline's top-2 logits were there."""
    diff = (base != paged).int()
    steps = torch.where(diff.any(1), diff.argmax(1), torch.full_like(diff[:, 0], new_tokens))
    row = int(steps.argmin())
    step = int(steps[row])
    with torch.inference_mode():
        res = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=step + 1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    top2 = res.logits[step][row].float().topk(2).values
    return {"row": row, "step": step, "baseline_top2_margin": float(top2[0] - top2[1]),
            "matching_prefix_fraction": float(steps.float().mean() / new_tokens)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--kv-memory", default="4GiB")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        msg = "CUDA is not available: the end-to-end GPU benchmark needs a GPU; skipped."
        print(msg)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"skipped": msg}, f, indent=2)
        return 0
    import hf_paged

    model = build_model()
    gen = torch.Generator(device="cuda").manual_seed(1)
    input_ids = torch.randint(3, 32000, (args.batch, args.prompt_len), device="cuda", generator=gen)
    tokens = args.batch * args.new

    base, base_s = timed_generate(model, input_ids, args.new)
    baseline_attn = model.config._attn_implementation
    model = hf_paged.wrap(model, block_size=16, kv_memory=args.kv_memory)
    paged, paged_s = timed_generate(model, input_ids, args.new)
    hf_paged.unwrap(model)

    agree = bool(torch.equal(base, paged))
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new,
        "baseline": {"attn_implementation": baseline_attn, "seconds": base_s, "tokens_per_s": tokens / base_s},
        "paged": {"kv_memory": args.kv_memory, "block_size": 16, "seconds": paged_s, "tokens_per_s": tokens / paged_s},
        "paged_over_baseline": base_s / paged_s,
        "tokens_agree": agree,
    }
    if not agree:
        result["first_mismatch"] = first_mismatch(model, input_ids, base, paged, args.new)
    print(f"{result['device']}: batch {args.batch} x prompt {args.prompt_len} -> {args.new} new tokens, fp16")
    print(f"  HF generate ({baseline_attn}): {tokens / base_s:8.1f} tok/s  ({base_s:.2f} s)")
    print(f"  hf_paged.wrap       : {tokens / paged_s:8.1f} tok/s  ({paged_s:.2f} s)")
    print(f"  paged / baseline    : {base_s / paged_s:.2f}x   tokens agree: {agree}")
    if not agree:
        print(f"  first mismatch: {result['first_mismatch']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
