"""Compile every Triton kernel for a CUDA target on a machine without a GPU (ahead-of-time, no launch).

    python benchmarks/compile_check.py [--arch 90] [--arch 80]

The interpreter tests prove the kernels compute the right thing; they do not prove that Triton's
CUDA compiler accepts them (layouts, dot shapes, shared memory per stage). This script swaps in a
driver that only reports a CUDA target, forces every launch to a compile-only warm-up, and calls
the kernel wrappers with the tile shapes they would pick on a GPU, for fp16/bf16/fp32, several head
dims and GQA groups, sliding window and softcap. Each compile runs Triton's whole pipeline down to
PTX and ptxas (bundled with the triton wheel), so register and shared-memory overflows show up too.
It prints one line per configuration and exits 1 if any failed. Run it with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check.py compiles for CUDA: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _TargetOnlyDriver:
    """Just enough of a driver for JITFunction.run to compile for ``target`` without a device."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):  # anything else would need a real GPU
        raise RuntimeError(f"compile-only driver has no {name!r}")


def _compile_only():
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return original(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = run


def _cases():
    from hf_paged.kernels.decode import default_block_n
    from hf_paged.kernels.prefill import default_tiles

    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    shapes = [(32, 8, 128), (8, 1, 256), (14, 2, 64), (16, 16, 80), (12, 12, 64)]  # heads, kv_heads, dim
    for dtype, (heads, kvh, dim), (window, softcap) in itertools.product(
            dtypes, shapes, [(None, None), (64, 30.0)]):
        d_pad = max(16, triton.next_power_of_2(dim))
        tiles = default_tiles(d_pad, dtype, heads // kvh, on_gpu=True)
        yield dtype, heads, kvh, dim, window, softcap, default_block_n(d_pad, on_gpu=True), tiles


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="CUDA compute capability, e.g. 90 (repeatable)")
    args = ap.parse_args(argv)
    from hf_paged.kernels.cache_write import write_kv_triton
    from hf_paged.kernels.decode import paged_decode
    from hf_paged.kernels.lora import lora_add_triton
    from hf_paged.kernels.prefill import paged_prefill
    from hf_paged.kernels.sampling import nucleus_threshold, tied_draw

    _compile_only()
    failures = 0
    for arch in args.arch or [90, 80]:
        driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
        for dtype, heads, kvh, dim, window, softcap, block_n, tiles in _cases():
            name = (f"sm_{arch} {str(dtype)[6:]:8s} H={heads:2d} KVH={kvh:2d} D={dim:3d} "
                    f"window={window} softcap={softcap}")
            blocks, bs = 8, 16
            q = torch.zeros(6, heads, dim, dtype=dtype)
            k_cache = torch.zeros(blocks, bs, kvh, dim, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            tables = torch.zeros(3, 4, dtype=torch.int32)
            cu = torch.tensor([0, 1, 2, 6], dtype=torch.int32)
            lens = torch.tensor([5, 9, 20], dtype=torch.int32)
            start = time.perf_counter()
            try:
                write_kv_triton(torch.zeros(6, kvh, dim, dtype=dtype), torch.zeros(6, kvh, dim, dtype=dtype),
                                k_cache, v_cache, torch.arange(6, dtype=torch.int64))
                for splits in (1, 4):
                    paged_decode(q[:3], k_cache, v_cache, tables, torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                                 lens, scale=dim ** -0.5, sliding_window=window, softcap=softcap,
                                 num_splits=splits, block_n=block_n)
                paged_prefill(q, k_cache, v_cache, tables, cu, lens, scale=dim ** -0.5, sliding_window=window,
                              softcap=softcap, tiles=tiles)
                print(f"ok    {name}  ({time.perf_counter() - start:.1f} s)", flush=True)
            except Exception:  # noqa: BLE001 - report every failing configuration, then fail
                failures += 1
                print(f"FAIL  {name}\n{traceback.format_exc(limit=-3)}", flush=True)
        # The LoRA SGMV kernels (shrink, expand): every dtype and stacked rank from the smallest (16) to
        # 256; the fp32 path multiplies in IEEE fp32, the others on the tensor cores.
        for dtype, rank in itertools.product([torch.float16, torch.bfloat16, torch.float32], (16, 64, 256)):
            name = f"sm_{arch} {str(dtype)[6:]:8s} LoRA SGMV R={rank:3d}"
            k_dim, n_dim, slots = 2048, 8192, 3
            start = time.perf_counter()
            try:
                lora_add_triton(torch.zeros(6, n_dim, dtype=dtype), torch.zeros(6, k_dim, dtype=dtype),
                                torch.zeros(slots, rank, k_dim, dtype=dtype),
                                torch.zeros(slots, n_dim, rank, dtype=dtype),
                                torch.full((slots,), rank, dtype=torch.int32), torch.ones(slots),
                                torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2, 4], dtype=torch.int32),
                                torch.tensor([1, 2], dtype=torch.int32), max_len=4)
                print(f"ok    {name}  ({time.perf_counter() - start:.1f} s)", flush=True)
            except Exception:  # noqa: BLE001
                failures += 1
                print(f"FAIL  {name}\n{traceback.format_exc(limit=-3)}", flush=True)
        # The device sampler's kernels on fp32 scores of 4 rows: the draw of tied top-k rows (per-row
        # temperature, uniform) and the top-p threshold of rows its candidates do not decide (bisection).
        rows = 4
        sampler_kernels = {
            "tied top-k draw": lambda: tied_draw(torch.zeros(rows, 151936), torch.ones(rows), torch.zeros(rows),
                                                 torch.zeros(rows), torch.ones(rows, dtype=torch.bool),
                                                 torch.full((rows,), 0.5)),
            "tied top-k draw, temperature as a reciprocal (CUDA)": lambda: tied_draw(
                torch.zeros(rows, 151936), torch.ones(rows), torch.zeros(rows), torch.zeros(rows),
                torch.ones(rows, dtype=torch.bool), torch.full((rows,), 0.5), recip=True),
            "top-p threshold": lambda: nucleus_threshold(torch.zeros(rows, 151936), torch.zeros(rows),
                                                         torch.ones(rows, dtype=torch.float64),
                                                         torch.full((rows,), 0.9), torch.zeros(rows, dtype=torch.bool),
                                                         torch.zeros(rows, 1)),
        }
        for kernel, launch in sampler_kernels.items():
            name = f"sm_{arch} float32  {kernel}"
            start = time.perf_counter()
            try:
                launch()
                print(f"ok    {name}  ({time.perf_counter() - start:.1f} s)", flush=True)
            except Exception:  # noqa: BLE001
                failures += 1
                print(f"FAIL  {name}\n{traceback.format_exc(limit=-3)}", flush=True)
    print(f"{failures} configuration(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
