"""The segmented LoRA op per call on CPU: the C++ kernel against a matmul pair per adapter run
(``reference.lora_add``) and against the base projection itself (oneDNN), 4 adapters of rank 16,
tokens split evenly over the base model and the 4 adapters.

    python benchmarks/lora_kernels.py [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from hf_paged.kernels import cpu, reference
from hf_paged.lora.layers import LayerWeights, LoraBatch


def bench_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit(f"the C++ kernel did not build: {cpu.build_error()}")
    S, R = args.adapters, args.rank
    print("| tokens | K | N | C++ us | matmul pair per run us | base projection us |\n|---|---|---|---|---|---|")
    for T, K, N in [(64, 576, 576), (64, 576, 1536), (64, 1536, 576), (1024, 576, 576), (1024, 576, 1536)]:
        w = LayerWeights.of(torch.randn(S, R, K), torch.randn(S, N, R), [R] * S, [2.0] * S)
        lens = [T // (S + 1)] * (S + 1)
        lens[-1] += T - sum(lens)
        batch = LoraBatch.build([None, *range(S)], lens, torch.device("cpu"))
        x, out, base = torch.randn(T, K), torch.randn(T, N), torch.randn(N, K)
        t_c = bench_us(lambda: cpu.lora_sgmv(out, x, w.a, w.bt, w.ranks_t, w.scales_t, batch.token_slot))
        t_r = bench_us(lambda: reference.lora_add(out, x, w.a, w.b, w.ranks, w.scales, batch.segments))
        t_b = bench_us(lambda: torch.ops.mkldnn._linear_pointwise(x, base, None, "none", [], ""), 100)
        print(f"| {T} | {K} | {N} | {t_c:.0f} | {t_r:.0f} | {t_b:.0f} |")


if __name__ == "__main__":
    main()
