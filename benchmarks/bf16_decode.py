"""bf16 CPU decode attention: the AVX-512 BF16 blocks of the C++ decode kernel against its AVX2 blocks, in one
process, switched with ``torch.ops.hf_paged_cpu.set_paged_decode_dpbf16``, interleaved rounds.

    python benchmarks/bf16_decode.py kernel [--rounds 5]            # the op alone, default-model shapes
    python benchmarks/bf16_decode.py engine --set A [--rounds 3]    # PagedPipeline, 64 chat requests, bf16

``kernel``: ms per call of ``hf_paged_cpu::paged_decode`` (9 heads, 3 KV heads, head_dim 64, block 16, shuffled
blocks) on three batches. ``engine``: output tok/s of the default model in bf16 on the chat requests of
``benchmarks/throughput.py`` (greedy, EOS or 256 new tokens), after one warm-up run; the prefix cache is reset
before each run. Greedy bf16 tokens depend on the kernel's rounding, so the two paths generate slightly
different token counts (reported).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _switch(on: bool) -> str:
    return torch.ops.hf_paged_cpu.set_paged_decode_dpbf16(on)


def kernel(rounds: int) -> None:
    from hf_paged.kernels import cpu

    if not cpu.available():
        raise SystemExit(f"the C++ kernel is not available: {cpu.build_error()}")
    heads, kv_heads, dim, bs = 9, 3, 64, 16
    g = torch.Generator().manual_seed(0)
    cases = {"64 seqs, context 50-800": torch.randint(50, 800, (64,), generator=g).tolist(),
             "64 seqs, context 100-350": torch.randint(100, 350, (64,), generator=g).tolist(),
             "8 seqs, context 1000-2000": torch.randint(1000, 2000, (8,), generator=g).tolist()}
    for name, lens in cases.items():
        nblk = sum(-(-n // bs) for n in lens) + 8
        kc = torch.randn(nblk, bs, kv_heads, dim, generator=g).bfloat16()
        vc = torch.randn(nblk, bs, kv_heads, dim, generator=g).bfloat16()
        perm = torch.randperm(nblk, generator=g).int()
        tables = torch.zeros(len(lens), max(-(-n // bs) for n in lens), dtype=torch.int32)
        used = 0
        for i, n in enumerate(lens):
            k = -(-n // bs)
            tables[i, :k] = perm[used:used + k]
            used += k
        q = torch.randn(len(lens), heads, dim, generator=g).bfloat16()
        cu = torch.arange(len(lens) + 1, dtype=torch.int32)
        args = (q, kc, vc, tables, cu, torch.tensor(lens, dtype=torch.int32))
        out = torch.empty_like(q)
        ms: dict[str, list[float]] = {}
        for _ in range(rounds):
            for on in (True, False):
                path = _switch(on)
                for _ in range(3):
                    cpu.paged_decode(*args, out, scale=dim ** -0.5)
                t0 = time.perf_counter()
                for _ in range(20):
                    cpu.paged_decode(*args, out, scale=dim ** -0.5)
                ms.setdefault(path, []).append((time.perf_counter() - t0) / 20 * 1e3)
        _switch(True)
        print(f"{name}: " + ", ".join(f"{p} {' '.join(f'{x:.3f}' for x in v)} ms (median {statistics.median(v):.3f},"
                                      f" min {min(v):.3f})" for p, v in ms.items()))


def engine(which: str, rounds: int) -> None:
    sys.path.insert(0, str(HERE))
    from throughput import build_prompts
    from transformers import AutoTokenizer

    from hf_paged.engine.pipeline import PagedPipeline
    from hf_paged.models import ensure_default_model, load_model

    path = str(ensure_default_model())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prompts = build_prompts(tok, 64, which)
    model, _ = load_model(path, dtype=torch.bfloat16)
    pipe = PagedPipeline(model, tok, kv_memory="1GiB", max_num_seqs=64, max_batch_tokens=1024)

    def run() -> tuple[float, int]:
        pipe.reset_prefix_cache()
        t0 = time.perf_counter()
        res = pipe.generate(prompts, max_new_tokens=256, progress=False)
        n = sum(len(r.token_ids) for r in res)
        return n / (time.perf_counter() - t0), n

    run()  # warm-up: the pool's pages are committed, the kernels built
    rates: dict[str, list[float]] = {}
    for r in range(rounds):
        for on in (True, False):
            path = _switch(on)
            tps, n = run()
            rates.setdefault(path, []).append(tps)
            print(f"round {r + 1} {path}: {tps:.1f} tok/s ({n} tokens)", flush=True)
    _switch(True)
    for path, v in rates.items():
        print(f"{path}: median {statistics.median(v):.1f}, min {min(v):.1f} tok/s")
    pipe.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["kernel", "engine"])
    ap.add_argument("--set", choices=["A", "B"], default="A")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "kernel":
        kernel(args.rounds or 5)
    else:
        engine(args.set, args.rounds or 3)


if __name__ == "__main__":
    main()
