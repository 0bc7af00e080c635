"""Paged attention kernels on CUDA vs torch SDPA (and flex_attention) over contiguous K/V.

    python benchmarks/kernels.py [--out results/kernels.json] [--dtype float16] [--no-flex] [--no-reference]

Decode: each point reads a ``batch x context`` paged KV cache (block size 16, shuffled blocks); the
table reports time, achieved bandwidth (K/V bytes read + q/out bytes) and its fraction of the card's
peak HBM bandwidth, next to SDPA (and flex_attention where it runs) on contiguous K/V of the same
sizes and hf_paged's own torch reference backend. Prefill: packed causal prefill of a few long
sequences vs SDPA ``is_causal``; the ratio column is SDPA time / paged time (> 1: paged is faster).
Without CUDA it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

# Peak HBM bandwidth (bytes/s) by device-name fragment; the first match wins.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100 80GB PCIe", 1.94e12), ("A100-SXM4-80GB", 2.04e12), ("A100 80GB", 2.0e12),
    ("A100", 1.56e12), ("L40S", 0.864e12), ("A10G", 0.6e12), ("L4", 0.3e12),
]
BLOCK_SIZE = 16
DEVICE = "cuda"  # a module constant so a CPU dry run (interpreter) can exercise the plumbing
DECODE_POINTS = [  # batch, context, heads, kv_heads, head_dim
    (64, 2048, 32, 8, 128),  # Llama-ish 8B decode step
    (1, 8192, 32, 8, 128),  # one long sequence: only split-K can fill the GPU
    (8, 4096, 32, 8, 128),
    (256, 512, 32, 8, 128),
    (32, 1024, 32, 32, 128),  # no GQA
    (16, 4096, 8, 1, 256),  # Gemma-ish head_dim 256
]
PREFILL_POINTS = [(4, 1024, 32, 8, 128), (2, 2048, 32, 8, 128), (8, 512, 32, 8, 128)]  # seqs, len, H, KVH, D


@dataclass(slots=True)
class Row:
    kind: str
    shape: str
    paged_ms: float
    sdpa_ms: float | None
    flex_ms: float | None
    reference_ms: float | None
    gbps: float | None = None
    peak_fraction: float | None = None
    tflops: float | None = None
    sdpa_over_paged: float | None = None


def peak_bandwidth(device: int) -> float | None:
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_BANDWIDTH:
        if fragment in name:
            return peak
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None  # DDR: 2 transfers/clock


def bench_ms(fn) -> float:
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    except TypeError:  # older triton without return_mode
        return float(triton.testing.do_bench(fn, warmup=10, rep=50))


def try_bench(fn) -> tuple[float | None, str | None]:
    try:
        fn()
        torch.cuda.synchronize()
        return bench_ms(fn), None
    except Exception as e:  # a comparison point that does not run is reported, not fatal
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def paged_inputs(num_seqs, ctx, kv_heads, head_dim, dtype, gen):
    """A shuffled paged cache holding ``num_seqs`` contexts of ``ctx`` tokens, and the same K/V contiguous."""
    per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = num_seqs * per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device=DEVICE, generator=gen)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=DEVICE, generator=gen).view(num_seqs, per_seq).to(torch.int32)
    # Contiguous [S, KVH, L, D] copies of exactly the same keys, for SDPA / flex.
    k = k_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    return k_cache, v_cache, tables, k, v


def flex_fn(causal: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[2], k.shape[2])
        return compiled(q, k, v, block_mask=mask, enable_gqa=True)

    return run


def decode_row(point, dtype, use_flex, use_ref, notes) -> Row:
    from hf_paged.kernels import reference
    from hf_paged.kernels.attention import paged_attention_triton

    batch, ctx, heads, kvh, dim = point
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    k_cache, v_cache, tables, k, v = paged_inputs(batch, ctx, kvh, dim, dtype, gen)
    q = torch.randn(batch, heads, dim, dtype=dtype, device=DEVICE, generator=gen)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    scale = dim ** -0.5
    args = (q, k_cache, v_cache, tables, cu, lens)
    paged_ms = bench_ms(lambda: paged_attention_triton(*args, scale=scale, max_seqlen_q=1, max_seqlen_k=ctx))
    q4 = q.unsqueeze(2)  # [B, H, 1, D]
    sdpa_ms, err = try_bench(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True))
    notes += [f"decode {point} sdpa: {err}"] if err else []
    flex_ms = None
    if use_flex:
        run = flex_fn(causal=False)
        flex_ms, err = try_bench(lambda: run(q4, k, v))
        notes += [f"decode {point} flex: {err}"] if err else []
    ref_ms = None
    if use_ref:
        ref_ms, err = try_bench(lambda: reference.paged_attention(*args, scale=scale, max_seqlen_q=1, max_seqlen_k=ctx))
        notes += [f"decode {point} torch reference: {err}"] if err else []
    elem = q.element_size()
    moved = 2 * batch * ctx * kvh * dim * elem + 2 * batch * heads * dim * elem  # K+V read, q read + out write
    gbps = moved / (paged_ms * 1e-3) / 1e9
    peak = peak_bandwidth(torch.cuda.current_device())
    shape = f"B={batch} ctx={ctx} H={heads} KVH={kvh} D={dim}"
    return Row("decode", shape, paged_ms, sdpa_ms, flex_ms, ref_ms, gbps=gbps,
               peak_fraction=gbps * 1e9 / peak if peak else None,
               sdpa_over_paged=sdpa_ms / paged_ms if sdpa_ms else None)


def prefill_row(point, dtype, use_flex, use_ref, notes) -> Row:
    from hf_paged.kernels import reference
    from hf_paged.kernels.attention import paged_attention_triton

    seqs, length, heads, kvh, dim = point
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    k_cache, v_cache, tables, k, v = paged_inputs(seqs, length, kvh, dim, dtype, gen)
    q = torch.randn(seqs, heads, length, dim, dtype=dtype, device=DEVICE, generator=gen)
    packed = q.transpose(1, 2).reshape(seqs * length, heads, dim).contiguous()
    cu = torch.arange(seqs + 1, dtype=torch.int32, device=DEVICE) * length
    lens = torch.full((seqs,), length, dtype=torch.int32, device=DEVICE)
    scale = dim ** -0.5
    args = (packed, k_cache, v_cache, tables, cu, lens)
    paged_ms = bench_ms(lambda: paged_attention_triton(*args, scale=scale, max_seqlen_q=length, max_seqlen_k=length))
    sdpa_ms, err = try_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                     enable_gqa=True))
    notes += [f"prefill {point} sdpa: {err}"] if err else []
    flex_ms = None
    if use_flex:
        run = flex_fn(causal=True)
        flex_ms, err = try_bench(lambda: run(q, k, v))
        notes += [f"prefill {point} flex: {err}"] if err else []
    ref_ms = None
    if use_ref:
        ref_ms, err = try_bench(lambda: reference.paged_attention(*args, scale=scale))
        notes += [f"prefill {point} torch reference: {err}"] if err else []
    flops = 2 * seqs * heads * length * length * dim  # causal: half of 4*S*H*L*L*D
    shape = f"S={seqs} len={length} H={heads} KVH={kvh} D={dim}"
    return Row("prefill", shape, paged_ms, sdpa_ms, flex_ms, ref_ms, tflops=flops / (paged_ms * 1e-3) / 1e12,
               sdpa_over_paged=sdpa_ms / paged_ms if sdpa_ms else None)


def fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(rows: list[Row]) -> str:
    head = ("| kind | shape | paged ms | SDPA ms | flex ms | torch ref ms | GB/s | % peak BW | TFLOP/s | "
            "SDPA/paged |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        pct = None if r.peak_fraction is None else 100 * r.peak_fraction
        lines.append(f"| {r.kind} | {r.shape} | {fmt(r.paged_ms)} | {fmt(r.sdpa_ms)} | {fmt(r.flex_ms)} | "
                     f"{fmt(r.reference_ms)} | {fmt(r.gbps, '.0f')} | {fmt(pct, '.1f')} | {fmt(r.tflops, '.1f')} | "
                     f"{fmt(r.sdpa_over_paged, '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--no-flex", action="store_true", help="skip flex_attention (it compiles per shape)")
    ap.add_argument("--no-reference", action="store_true", help="skip the torch reference backend")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        msg = "CUDA is not available: the kernel benchmark needs a GPU; skipped."
        print(msg)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"skipped": msg}, f, indent=2)
        return 0
    import triton

    dtype = getattr(torch, args.dtype)
    notes: list[str] = []
    rows = []
    # flex_attention compiles for every shape: only the headline decode and prefill points get it.
    for i, point in enumerate(DECODE_POINTS):
        rows.append(decode_row(point, dtype, not args.no_flex and i == 0, not args.no_reference, notes))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    for i, point in enumerate(PREFILL_POINTS):
        rows.append(prefill_row(point, dtype, not args.no_flex and i == 0, not args.no_reference, notes))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    device = torch.cuda.get_device_name()
    peak = peak_bandwidth(torch.cuda.current_device())
    print(f"\n{device}, {args.dtype}, block_size {BLOCK_SIZE}, peak HBM {fmt(peak and peak / 1e12, '.2f')} TB/s, "
          f"torch {torch.__version__}, triton {triton.__version__}\n")
    print(markdown(rows))
    for note in notes:
        print("note:", note)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "dtype": args.dtype, "block_size": BLOCK_SIZE, "peak_bandwidth": peak,
                       "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv),
                       "rows": [asdict(r) for r in rows], "notes": notes}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
