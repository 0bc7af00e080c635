"""Prefill of the chat requests alone, in one process: PagedPipeline computes each prompt and one token.

    python benchmarks/prefill_chat.py [--dtype float32|bfloat16] [--set A|B] [--runs 4]
    PYTHONPATH=/path/to/other/checkout python benchmarks/prefill_chat.py   # the same for another version

The default model, the 64 requests of ``benchmarks/throughput.py`` (set A: 22 chats repeated, so most prompts
find a cached prefix after the first step; set B: short tasks), ``max_num_seqs=64``, ``max_batch_tokens=1024``.
After a two-prompt warm-up, each run resets the prefix cache and times ``generate(prompts, max_new_tokens=1)``;
the first run also commits the KV pool's pages (first touch), the later ones reuse them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--set", choices=["A", "B"], default="A")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from throughput import build_prompts
    from transformers import AutoTokenizer

    import hf_paged
    from hf_paged.engine.pipeline import PagedPipeline
    from hf_paged.models import ensure_default_model, load_model

    path = str(ensure_default_model())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prompts = build_prompts(tok, 64, args.set)
    model, _ = load_model(path, dtype=getattr(torch, args.dtype))
    pipe = PagedPipeline(model, tok, kv_memory="1GiB", max_num_seqs=64, max_batch_tokens=1024)
    pipe.generate(prompts[:2], max_new_tokens=4, progress=False)
    times = []
    for _ in range(args.runs):
        pipe.reset_prefix_cache()
        t0 = time.perf_counter()
        pipe.generate(prompts, max_new_tokens=1, progress=False)
        times.append(time.perf_counter() - t0)
    pipe.close()
    print(f"hf_paged from {Path(hf_paged.__file__).parent}; {args.dtype}, set {args.set}, "
          f"{sum(map(len, prompts))} prompt tokens")
    print("seconds per run (the first cold): " + " ".join(f"{t:.3f}" for t in times))


if __name__ == "__main__":
    main()
