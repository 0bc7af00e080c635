"""Sweep the Triton prefill tile shapes and decode split counts on CUDA; prints the fastest per point.

    python benchmarks/tune_gpu.py [--out results/tune.json] [--dtype float16]

Prefill: every (block_m, block_n, num_warps, num_stages) in a small grid on the first prefill point
of ``kernels.py``, then the five fastest on the other points, each next to SDPA. Decode: num_splits
and block_n on the small-batch long-context points, where one launch cannot fill the GPU. The
defaults in ``hf_paged/kernels/{prefill,decode}.py`` come from these figures (docs/benchmarks.md).
Without CUDA it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to tune; skipped.")
        return 0
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from kernels import DECODE_POINTS, PREFILL_POINTS, bench_ms, paged_inputs  # benchmarks/kernels.py

    from hf_paged.kernels.decode import paged_decode
    from hf_paged.kernels.prefill import PrefillTiles, paged_prefill

    dtype = getattr(torch, args.dtype)
    results: dict = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "prefill": [], "decode": []}

    def prefill_case(point):
        seqs, length, heads, kvh, dim = point
        gen = torch.Generator(device="cuda").manual_seed(0)
        k_cache, v_cache, tables, k, v = paged_inputs(seqs, length, kvh, dim, dtype, gen)
        q = torch.randn(seqs, heads, length, dim, dtype=dtype, device="cuda", generator=gen)
        packed = q.transpose(1, 2).reshape(seqs * length, heads, dim).contiguous()
        cu = torch.arange(seqs + 1, dtype=torch.int32, device="cuda") * length
        lens = torch.full((seqs,), length, dtype=torch.int32, device="cuda")
        sdpa = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=dim ** -0.5,
                                                               enable_gqa=True))
        run = lambda tiles: paged_prefill(packed, k_cache, v_cache, tables, cu, lens,  # noqa: E731
                                          scale=dim ** -0.5, tiles=tiles)
        return sdpa, run

    grid = [PrefillTiles(m, n, w, s) for m, n, w, s in
            itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]
    sdpa, run = prefill_case(PREFILL_POINTS[0])
    timed = []
    for tiles in grid:
        try:
            ms = bench_ms(lambda: run(tiles))
        except Exception as e:  # noqa: BLE001 - out of shared memory etc.: skip the shape
            print(f"prefill {PREFILL_POINTS[0]} {tiles}: {type(e).__name__}", flush=True)
            continue
        timed.append((ms, tiles))
        print(f"prefill {PREFILL_POINTS[0]} {tiles}: {ms:.3f} ms  SDPA {sdpa:.3f}  ratio {sdpa / ms:.2f}", flush=True)
    timed.sort(key=lambda t: t[0])
    best = [t for _, t in timed[:5]]
    for point in PREFILL_POINTS:
        sdpa, run = prefill_case(point)
        for tiles in best:
            ms = bench_ms(lambda: run(tiles))
            results["prefill"].append({"point": point, "tiles": [tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages],
                                       "ms": ms, "sdpa_ms": sdpa, "sdpa_over_paged": sdpa / ms})
            print(f"BEST prefill {point} {tiles}: {ms:.3f} ms  SDPA {sdpa:.3f}  ratio {sdpa / ms:.2f}", flush=True)

    for point in [p for p in DECODE_POINTS if p[0] <= 16]:
        batch, ctx, heads, kvh, dim = point
        gen = torch.Generator(device="cuda").manual_seed(0)
        k_cache, v_cache, tables, k, v = paged_inputs(batch, ctx, kvh, dim, dtype, gen)
        q = torch.randn(batch, heads, dim, dtype=dtype, device="cuda", generator=gen)
        cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        for splits, block_n in itertools.product((1, 8, 16, 32, 64), (32, 64, 128)):
            try:
                ms = bench_ms(lambda: paged_decode(q, k_cache, v_cache, tables, cu, lens, scale=dim ** -0.5,
                                                   num_splits=splits, block_n=block_n))
            except Exception as e:  # noqa: BLE001
                print(f"decode {point} splits={splits} block_n={block_n}: {type(e).__name__}")
                continue
            gbps = 2 * batch * ctx * kvh * dim * q.element_size() / (ms * 1e-3) / 1e9
            results["decode"].append({"point": point, "splits": splits, "block_n": block_n, "ms": ms, "gbps": gbps})
            print(f"decode {point} splits={splits:2d} block_n={block_n:3d}: {ms:.4f} ms {gbps:6.0f} GB/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
