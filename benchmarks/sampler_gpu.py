"""The device sampler's time per step at 256 rows of a 128K vocabulary, by sampling setting, with its Triton
kernels on and off (HF_PAGED_FUSED_DRAW): greedy, generate()'s top_k=50 at temperature 0.6 (the GPU
benchmark's setting), top-p 0.9 without top_k (what OpenAI clients send) and both together; and top_k=50
with repetition_penalty 1.1 and frequency_penalty 0.2 over 1124-token histories, read from the rows' token
lists (rows without an owner) or from the sampler's PenaltyState (rows naming their sequence, as the
engine's do; their lists grow by each pick, outside the timed call).

    python benchmarks/sampler_gpu.py [--rows 256] [--vocab 128256] [--rounds 3] [--out FILE.json] [--cpu-dry-run]

Logits are random, rounded to bf16 (ties, as a bf16 model's have), from peaked to flat rows. Each call is
``DeviceSampler.sample`` (one copy back, so it waits for the device) on rows built once per setting,
unseeded as the throughput benchmark's are (so the timing is the sampler's, not the set-up of 256
requests); rounds interleave the settings and report the median of ``--reps`` calls each. The JSON is
rewritten after every round, so a stage cut short keeps the rounds that finished.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU, 8 rows of 1024 (checks the script only)")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu_dry_run else "cuda"
    if args.cpu_dry_run:  # the kernels in Triton's interpreter (set before triton is imported)
        args.rows, args.vocab, args.reps = 8, 1024, 1
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from hf_paged.engine import device_sampler
    from hf_paged.engine.device_sampler import DeviceSampler
    from hf_paged.engine.params import SamplingParams
    from hf_paged.engine.sampler import SamplingRow

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([8.0, 4.0, 2.0, 1.0]).repeat(args.rows // 4 + 1)[: args.rows].view(-1, 1)
    logits = (torch.randn(args.rows, args.vocab, generator=g) * scale).bfloat16().float().to(device)
    settings = {
        "greedy": dict(do_sample=False),
        "top_k=50 T=0.6": dict(do_sample=True, temperature=0.6),
        "top_p=0.9 T=0.7": dict(do_sample=True, temperature=0.7, top_k=0, top_p=0.9),
        "top_k=50 top_p=0.9": dict(do_sample=True, temperature=0.7, top_p=0.9),
    }
    penalised = {"penalties, lists": None, "penalties, state": True}
    runs = [(name, flag) for name in settings for flag in ("1", "0") if not (name == "greedy" and flag == "0")]
    runs += [(name, "1") for name in penalised]
    times: dict[str, list[float]] = {f"{n} kernels={'on' if f == '1' else 'off'}": [] for n, f in runs}
    sampler = DeviceSampler(args.vocab)
    rows = {name: [SamplingRow(SamplingParams(max_new_tokens=8, **kw), [1, 2, 3], 0, None) for _ in range(args.rows)]
            for name, kw in settings.items()}

    class Owner:  # what the engine's rows name (its Sequence); the state reads only .finished
        finished = False

    pen = SamplingParams(max_new_tokens=10_000, do_sample=True, temperature=0.6, repetition_penalty=1.1,
                         frequency_penalty=0.2)
    for name, owned in penalised.items():
        rows[name] = [SamplingRow(pen, torch.randint(0, args.vocab, (1124,), generator=g).tolist(), 100, None,
                                  Owner() if owned else None) for _ in range(args.rows)]
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"

    def write() -> None:
        if args.out:
            with open(args.out + ".tmp", "w") as f:
                json.dump({"device": device_name, "date": time.strftime("%Y-%m-%d"), "rows": args.rows,
                           "vocab": args.vocab, "kernels_ok": device_sampler.kernels_ok(), "ms": times}, f, indent=1)
            os.replace(args.out + ".tmp", args.out)

    def grow(name: str, out) -> None:
        if penalised.get(name):  # as the engine appends each pick to its sequence (not timed)
            for r, t in zip(rows[name], out.tokens):
                r.token_ids.append(t)
                r.num_generated += 1

    for name, flag in runs:  # warm-up: Triton compiles here
        os.environ["HF_PAGED_FUSED_DRAW"] = flag
        grow(name, sampler.sample(logits.clone(), rows[name]))
    for r in range(args.rounds):
        for name, flag in (runs if r % 2 == 0 else runs[::-1]):
            os.environ["HF_PAGED_FUSED_DRAW"] = flag
            ts = []
            for _ in range(args.reps):
                scores = logits.clone()
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = sampler.sample(scores, rows[name])
                ts.append(time.perf_counter() - t)
                grow(name, out)
            times[f"{name} kernels={'on' if flag == '1' else 'off'}"].append(statistics.median(ts) * 1e3)
        write()
    os.environ.pop("HF_PAGED_FUSED_DRAW", None)
    print(f"device sampler, {args.rows} rows x {args.vocab} (ms per call, median of {args.reps}; rounds; "
          f"kernels stayed on: {device_sampler.kernels_ok()}) on {device_name}")
    for k, v in times.items():
        print(f"  {k:32s} median {statistics.median(v):7.3f}  min {min(v):7.3f}  rounds {[round(x, 3) for x in v]}")
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
