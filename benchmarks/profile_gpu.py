"""Where a decode step's time goes on the GPU: torch.profiler over PagedPipeline decode steps at 256 rows.

    python benchmarks/profile_gpu.py --out DIR [--steps 20] [--eager] [--cpu-dry-run]

A random Llama-3.2-1B-shape model in bf16 (nothing downloaded), 256 requests of 128 prompt tokens that
each decode ``--steps + 16`` tokens; after the prefill and a few decode steps, ``--steps`` engine steps
run under the profiler. Writes ``DIR/profile_<mode>.txt`` (the top kernels by CUDA time and the top
host-side ops by CPU time) and ``DIR/trace_<mode>.json`` (a Chrome trace; open it in Perfetto), for
CUDA graphs (default) and, with ``--eager``, for the eager path as well. Host gaps between kernels are
what the overlapped loop and the graphs are meant to remove: the trace shows them directly.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def build(tiny: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    size = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512) if tiny else
            dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=128256))
    cfg = LlamaConfig(**size, tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.eval() if tiny else model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    return model


def profile(model, tok, args, eager: bool, out: Path, device: str) -> str:
    import hf_paged
    from torch.profiler import ProfilerActivity, profile as torch_profile

    seqs = 8 if args.cpu_dry_run else 256
    pipe = hf_paged.PagedPipeline(model, tok, kv_memory=args.kv_memory, max_num_seqs=seqs, max_batch_tokens=8192,
                                  enforce_eager=eager)
    mode = "eager" if eager else "graphs"
    try:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, model.config.vocab_size, (16 if args.cpu_dry_run else 128,),
                                 generator=g).tolist() for _ in range(seqs)]
        total = args.steps + 16
        reqs = [pipe.submit(p, max_new_tokens=total, do_sample=True, temperature=0.6, ignore_eos=True)
                for p in prompts]
        deadline = time.monotonic() + args.warmup_s
        while pipe.stats().tokens_generated < seqs * 8:  # prefill done, a few decode steps run
            if any(r.done for r in reqs) or time.monotonic() > deadline:  # failed (raises below) or too slow
                break
            time.sleep(0.001)
        if any(r.done for r in reqs):
            for r in reqs:
                r.result(timeout=1)  # a request that failed raises its error here
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        # By default the profiler records the host ops of its own thread only; the steps run on the engine's.
        try:
            from torch._C._profiler import _ExperimentalConfig

            every_thread, host_note = _ExperimentalConfig(profile_all_threads=True), ""
        except (ImportError, TypeError):
            every_thread, host_note = None, " (this torch cannot record the engine thread's host ops)"
        prof = torch_profile(activities=activities, record_shapes=False, experimental_config=every_thread)
        try:
            prof.start()  # (torch's own distributed debug handler profiles the same way)
        except Exception as exc:  # noqa: BLE001 - the experimental option refused: kernels and this thread only
            host_note = f" (profile_all_threads failed: {type(exc).__name__}; no host ops of the engine thread)"
            prof = torch_profile(activities=activities, record_shapes=False)
            prof.start()
        start_steps = pipe.stats().steps
        try:
            while pipe.stats().steps < start_steps + args.steps and not all(r.done for r in reqs):
                time.sleep(0.002)
        finally:
            prof.stop()
        steps = pipe.stats().steps - start_steps
        graphs = pipe.engine.runner.graphs
        state = ("none (eager)" if graphs is None else
                 f"captured={graphs.captured}, {graphs.replays} replays by bucket {graphs.replays_by_bucket}")
        for r in reqs:
            r.cancel()  # the profile is taken; the rest of the decode is not needed
        for r in reqs:
            r.result(timeout=60)  # (raises a request's error, if one failed)
    finally:
        pipe.close()
        hf_paged.unwrap(model)
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    text = (f"{mode}: {steps} engine steps of {seqs} decoding sequences profiled; decode graphs: {state}"
            f"{host_note}\n\n"
            + prof.key_averages().table(sort_by=sort, row_limit=25)
            + "\n\nHost side, by CPU time:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    (out / f"profile_{mode}.txt").write_text(text)
    prof.export_chrome_trace(str(out / f"trace_{mode}.json"))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="also profile enforce_eager=True")
    ap.add_argument("--kv-memory", default="16GiB")
    ap.add_argument("--warmup-s", type=float, default=30.0, help="the most to wait for the prefill before profiling")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny fp32 model on CPU: checks the plumbing only")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to profile (use --cpu-dry-run to check the script)")
        return 0
    if args.cpu_dry_run:
        args.steps, args.kv_memory = min(args.steps, 4), "64MiB"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput_gpu import make_tokenizer

    for eager in ([False, True] if args.eager else [False]):
        model = build(args.cpu_dry_run, device)
        text = profile(model, make_tokenizer(model.config.vocab_size), args, eager, out, device)
        print(text[:6000], flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
