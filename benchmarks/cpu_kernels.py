"""CPU decode attention and linear layers: the compiled paths vs the torch ones they replace.

    python benchmarks/cpu_kernels.py [--threads 2] [--repeats 5]

Attention: ``kernels.cpu.paged_attention`` (C++, reads blocks in place) vs ``kernels.reference``
(gather + SDPA) on decode batches shaped like the default model (9 heads, 3 KV heads, head_dim 64,
block size 16, fp32) with shuffled block tables, and the C++ kernel on fp32 against bf16 caches. Linears: oneDNN (what ``wrap`` uses above 48 rows)
vs ``F.linear`` (MKL) for the default model's projections and its 49152-wide output layer (weights
hot in cache); then all matmuls of one decode step with cold weights (30 distinct layers plus the
output layer, 535 MB, streamed from DRAM as in the engine): the C++ skinny kernel (what ``wrap`` uses
up to 48 rows) vs oneDNN. The two variants of each pair alternate within every repeat; the medians
and their ratio are printed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hf_paged.kernels import cpu, reference


def timed(fn, inner: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e3


def compare(name: str, a, b, repeats: int, labels=("torch", "compiled")) -> None:
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(f"| {name} | {ma:.2f} | {mb:.2f} | {ma / mb:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit(f"the C++ kernel is not available: {cpu.build_error()}")
    gen = torch.Generator().manual_seed(0)
    print("| decode attention (per layer) | torch path ms | C++ ms | speed-up |\n|---|---|---|---|")
    for seqs, lo, hi in [(64, 50, 800), (24, 400, 900), (8, 1000, 2000), (1, 4000, 4001)]:
        lens = torch.randint(lo, hi, (seqs,), generator=gen, dtype=torch.int32)
        width = int(-(-int(lens.max()) // 16))
        blocks = seqs * width
        kc = torch.randn(blocks, 16, 3, 64, generator=gen)
        vc = torch.randn(blocks, 16, 3, 64, generator=gen)
        tables = torch.randperm(blocks, generator=gen).view(seqs, width).to(torch.int32)
        cu = torch.arange(seqs + 1, dtype=torch.int32)
        q = torch.randn(seqs, 9, 64, generator=gen)
        call = (q, kc, vc, tables, cu, lens)
        compare(f"{seqs} seqs, context {lo}-{hi}", lambda: reference.paged_attention(*call, scale=0.125),
                lambda: cpu.paged_attention(*call, scale=0.125), args.repeats)
        half = (q.bfloat16(), kc.bfloat16(), vc.bfloat16(), tables, cu, lens)
        compare(f"{seqs} seqs, context {lo}-{hi}: C++ fp32 (left) vs C++ bf16 cache (right)",
                lambda: cpu.paged_attention(*call, scale=0.125), lambda: cpu.paged_attention(*half, scale=0.125),
                args.repeats)
    print("\n| linear | F.linear (MKL) ms | oneDNN ms | speed-up |\n|---|---|---|---|")
    for rows in (8, 24, 64):
        x, h = torch.randn(rows, 576, generator=gen), torch.randn(rows, 1536, generator=gen)
        ws = [torch.randn(o, i, generator=gen) * 0.05 for o, i in
              [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]]
        ins = [x] * 6 + [h]
        compare(f"one layer's 7 projections, {rows} rows", lambda: [F.linear(a, w) for a, w in zip(ins, ws)],
                lambda: [torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "") for a, w in zip(ins, ws)],
                args.repeats)
        head = torch.randn(49152, 576, generator=gen) * 0.05
        compare(f"output layer 576x49152, {rows} rows", lambda: F.linear(x, head),
                lambda: torch.ops.mkldnn._linear_pointwise(x, head, None, "none", [], ""), args.repeats)

    print("\n| one decode step's matmuls, cold weights | oneDNN ms | C++ skinny ms | speed-up |\n|---|---|---|---|")
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    model = [[torch.randn(o, i, generator=gen) * 0.05 for o, i in shapes] for _ in range(30)]
    model.append([torch.randn(49152, 576, generator=gen) * 0.05])
    for rows in (1, 8, 16, 24, 32, 48, 64):
        x, h = torch.randn(rows, 576, generator=gen), torch.randn(rows, 1536, generator=gen)

        def step(fn):
            return lambda: [fn(h if w.shape[1] == 1536 else x, w) for layer in model for w in layer]

        compare(f"{rows} rows", step(lambda a, w: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")),
                step(cpu.skinny_linear), args.repeats)


if __name__ == "__main__":
    main()
