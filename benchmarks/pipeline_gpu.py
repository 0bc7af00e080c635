"""PagedPipeline on CUDA vs HF ``generate()`` in padded static batches and transformers' ``generate_batch``.

    python benchmarks/pipeline_gpu.py --tokenizer DIR [--out results/pipeline.json] [--requests 256]

Same random-weight ~1B Llama as ``e2e_gpu.py`` (fp16, nothing downloaded); its vocabulary is the
tokenizer's (any local tokenizer folder, e.g. the default model's). Requests are random token ids with
prompt lengths drawn from 16..1024 and each generates exactly ``--new`` tokens greedily (EOS ignored,
since a random model's EOS is meaningless). Systems, in one process and on the same prompts:
PagedPipeline (warmed up first, so Triton's compilation is not timed); HF ``generate`` over padded
batches of ``--static-batch`` prompts in arrival order; and ``model.generate_batch`` when transformers
has it. Reports generated tokens/s, ratios, peak GPU memory, and how many requests agree token for
token with the static-batch baseline (fp16 and padding make exact agreement on random weights
uncommon past near-ties, so this is a sanity figure, not a correctness test; the CPU fp32 tests are).
Without CUDA it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


DEVICE = "cuda"


def build_model(vocab: int, tiny: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128) if tiny else
            dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=5632))
    config = LlamaConfig(**size, vocab_size=vocab, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config)
    model = model.eval() if tiny else model.half().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="local tokenizer folder")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--static-batch", type=int, default=32)
    ap.add_argument("--kv-memory", default="16GiB")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--no-generate-batch", action="store_true")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny fp32 model on CPU: checks the plumbing only")
    args = ap.parse_args(argv)
    global DEVICE
    if args.cpu_dry_run:
        DEVICE = "cpu"
        for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
            setattr(torch.cuda, name, lambda *a, **k: None)
        torch.cuda.max_memory_allocated = lambda *a, **k: 0
        torch.cuda.get_device_name = lambda *a, **k: "cpu (dry run)"
    elif not torch.cuda.is_available():
        msg = "CUDA is not available: the pipeline GPU benchmark needs a GPU; skipped."
        print(msg)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"skipped": msg}, f, indent=2)
        return 0
    from transformers import AutoTokenizer

    from hf_paged import PagedPipeline, unwrap

    tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    vocab = len(tok)
    model = build_model(vocab, tiny=args.cpu_dry_run)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 1025, (args.requests,), generator=gen).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    tokens = args.requests * args.new
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "command": " ".join(sys.argv), "requests": args.requests, "new_tokens": args.new,
                     "prompt_tokens": sum(lengths), "systems": {}}

    def record(name: str, seconds: float, outputs: list[list[int]]) -> None:
        results["systems"][name] = {"seconds": seconds, "tokens_per_s": tokens / seconds,
                                    "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}
        print(f"{name:14s} {tokens / seconds:9.1f} tok/s  ({seconds:.2f} s, peak "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)", flush=True)
        results.setdefault("_outputs", {})[name] = outputs

    # HF generate in padded static batches (left padding, arrival order).
    with torch.inference_mode():
        warm = torch.tensor([prompts[0][:16]], device=DEVICE)
        model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=4)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        static = []
        for i in range(0, len(prompts), args.static_batch):
            chunk = prompts[i:i + args.static_batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=DEVICE)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=DEVICE)
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            static.extend(out[:, width:].tolist())
        torch.cuda.synchronize()
        record("hf_static", time.perf_counter() - start, static)

    torch.cuda.empty_cache()
    pipe = PagedPipeline(model, tok, kv_memory=args.kv_memory, max_num_seqs=args.max_num_seqs,
                         max_batch_tokens=args.max_batch_tokens)
    # Warm-up: compiles the Triton kernels for decode, prefill and mixed steps.
    # Its prompts are fresh ones, so the timed run finds none of them in the prefix cache.
    warm = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (16, 300, 1000, 40)]
    pipe.generate(warm, max_new_tokens=4, progress=False, ignore_eos=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    res = pipe.generate(prompts, progress=False, ignore_eos=True, **kw)
    torch.cuda.synchronize()
    record("paged", time.perf_counter() - start, [r.token_ids for r in res])
    results["paged_stats"] = {k: v for k, v in pipe.stats().items() if isinstance(v, (int, float, str))}
    pipe.close()
    unwrap(model)

    if not args.no_generate_batch and hasattr(model, "generate_batch"):
        from transformers import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        try:
            model.generate_batch(inputs=prompts[:4], generation_config=cfg)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            res = model.generate_batch(inputs=prompts, generation_config=cfg)
            torch.cuda.synchronize()
            outs = [res[k].generated_tokens for k in sorted(res, key=lambda k: int(k.split("_")[-1]))]
            record("hf_generate_batch", time.perf_counter() - start, outs)
        except Exception as exc:  # noqa: BLE001 - a baseline failing must not hide the others
            print(f"generate_batch failed: {exc!r}")
            results["systems"]["hf_generate_batch"] = {"error": repr(exc)}

    outputs = results.pop("_outputs")
    base = results["systems"]["hf_static"]["seconds"]
    for name, sysres in results["systems"].items():
        if "seconds" in sysres:
            sysres["speedup_vs_hf_static"] = base / sysres["seconds"]
            sysres["requests_equal_to_hf_static"] = sum(a == b for a, b in zip(outputs[name], outputs["hf_static"]))
    print(json.dumps(results["systems"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
