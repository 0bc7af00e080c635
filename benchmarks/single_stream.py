"""Single-stream decode on CPU: time per output token of one request (the interactive case).

PagedPipeline on the default model, one chat request, greedy, ``--max-new-tokens`` tokens with
``ignore_eos``; the first token (prefill) is left out. ``--compare-env VAR`` runs each round twice,
with VAR=1 and VAR=0 (e.g. HF_PAGED_CPU_GEMM_BF16), each in a fresh process, interleaved.

    python benchmarks/single_stream.py --dtype bfloat16 --rounds 3 --compare-env HF_PAGED_CPU_GEMM_BF16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def one(dtype: str, max_new: int) -> float:
    import torch

    import hf_paged

    model, tok = hf_paged.load_default_model(dtype=getattr(torch, dtype))
    with hf_paged.PagedPipeline(model, tok, kv_memory="256MiB") as pipe:
        msgs = [{"role": "user", "content": "Tell me about the history of the bicycle."}]
        pipe.generate(msgs, max_new_tokens=4, do_sample=False)  # warm up
        stamps = [time.perf_counter() for ev in pipe.stream(msgs, max_new_tokens=max_new, do_sample=False,
                                                             ignore_eos=True)]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare-env", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(one(args.dtype, args.max_new_tokens)))
        return
    variants = ["1", "0"] if args.compare_env else [None]
    rows = []
    for r in range(args.rounds):
        row = {}
        for v in (variants if r % 2 == 0 else variants[::-1]):
            env = dict(os.environ)
            if v is not None:
                env[args.compare_env] = v
            out = subprocess.run([sys.executable, __file__, "--worker", "--dtype", args.dtype, "--max-new-tokens",
                                  str(args.max_new_tokens)], env=env, capture_output=True, text=True, check=True)
            row[f"{args.compare_env}={v}" if v is not None else "ms"] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{k} {ms:.2f} ms/token" for k, ms in row.items()), flush=True)
    for k in rows[0]:
        vals = [x[k] for x in rows]
        print(f"{k}: median {statistics.median(vals):.2f} ms/token, min {min(vals):.2f}")


if __name__ == "__main__":
    main()
