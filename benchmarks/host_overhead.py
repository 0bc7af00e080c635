"""Engine host time per decode step at N running sequences: everything outside the model forward.

A 2-layer random Llama with the default model's tokenizer (vocabulary 49152), so the forward is
short and the host work (schedule, step plan and metadata, sampling over [N, vocab], postprocess,
detokenizing and emitting) is what the timers see. Each phase is timed by wrapping the engine's own
methods; the forward (``Runner.execute`` less the metadata tensors it builds) is reported apart and
left out of the host total. ``--prompt-len`` sets the context (the block tables grow with it). Greedy
rows go through the fused LM head on CPU (``Runner.fused_head``): their argmax is then part of the forward.

    python benchmarks/host_overhead.py --seqs 256 --steps 50 [--prompt-len 1024] [--logprobs] [--penalties]
                                       [--sampled-every K [--top-p P]]

``HF_PAGED_SAMPLER=device`` times the device sampler (on CPU tensors here: its tensor work is then host
work too, which on CUDA it is not).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def drain(delivery) -> None:
    """Take the requests' queued events, as their consumers would (a server streams them as they come). Left
    queued, they pile up by the thousand and make every garbage collection pass longer."""
    for streams in delivery.requests.values():
        events = streams[0].request._events
        while not events.empty():
            events.get_nowait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=0, help="prompt tokens (0: one short chat prompt)")
    ap.add_argument("--logprobs", action="store_true", help="every request asks for its tokens' logprobs (as TGI's "
                    "/generate_stream always does)")
    ap.add_argument("--sampled-every", type=int, default=0, help="every K-th request samples (temperature 0.7, "
                    "top_k 50, seeded) instead of decoding greedily: mixed traffic (0: all greedy)")
    ap.add_argument("--top-p", type=float, default=None, help="sampled requests use top_p P and no top-k (what "
                    "OpenAI and TGI clients send) instead of top_k 50")
    ap.add_argument("--penalties", action="store_true", help="every request sets repetition_penalty 1.1 and "
                    "frequency_penalty 0.2 (what many clients send)")
    args = ap.parse_args()

    from served import tiny_chat_pipeline

    from hf_paged.engine.host_runtime import park_openmp_workers
    from hf_paged.engine.params import SamplingParams

    pipe = tiny_chat_pipeline(max_model_len=args.prompt_len + 1024, max_num_seqs=args.seqs, max_batch_tokens=4096,
                              kv_memory=f"{256 + args.seqs * (args.prompt_len + 128) // 1024}MiB")
    eng, delivery = pipe.engine, pipe.delivery
    timings: dict[str, list[float]] = defaultdict(list)

    def timed(obj, name, label):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[label].append(time.perf_counter() - t)
        setattr(obj, name, wrapper)

    timed(eng.scheduler, "schedule", "schedule")
    timed(eng.runner, "plan", "plan (ids, positions, slots)")
    timed(eng.runner, "execute", "execute (forward + metadata)")
    from hf_paged.kv.metadata import PagedMetadata

    timed(PagedMetadata, "build", "metadata tensors (eager path)")
    timed(eng.sampler, "sample", "sample")
    timed(delivery, "deliver", "deliver (detokenize, emit)")
    import hf_paged.engine.sampler as sampler_mod

    # The greedy pick over [N, vocab] logits: host work on CPU, but on CUDA it runs on the device (the
    # device sampler), so it is reported apart as well.
    timed(sampler_mod, "_argmax", "argmax (on the device on CUDA)")
    if hasattr(sampler_mod, "_argmax_logprob"):
        timed(sampler_mod, "_argmax_logprob", "argmax + logprob (on the device on CUDA)")

    prompt = pipe.tokenizer("Tell me a long story about a lighthouse keeper.")["input_ids"]
    if args.prompt_len:
        prompt = (prompt * (args.prompt_len // len(prompt) + 1))[: args.prompt_len]
    top_p = dict(top_k=0, top_p=args.top_p) if args.top_p else {}
    rounds = []
    for r in range(args.rounds):
        from hf_paged.engine.request import Request

        for i in range(args.seqs):
            sample = bool(args.sampled_every) and i % args.sampled_every == 0
            params = SamplingParams.from_request(None, max_new_tokens=10_000, do_sample=sample, ignore_eos=True,
                                                 logprobs=args.logprobs,
                                                 **(dict(temperature=0.7, top_k=50, seed=i) | top_p if sample else {}),
                                                 **(dict(repetition_penalty=1.1, frequency_penalty=0.2)
                                                    if args.penalties else {}))
            delivery.add(Request(f"r{r}-{i}", prompt, prompt, params, lambda req: None))
        while any(s.num_computed < s.num_prompt for s in eng.scheduler.running) or eng.scheduler.waiting:
            delivery.deliver(eng.step())
        drain(delivery)
        for v in timings.values():
            v.clear()
        steps = []
        for _ in range(args.steps):
            t = time.perf_counter()
            records = eng.step()
            park_openmp_workers()  # as the pipeline's thread does after each step on CPU (HF_PAGED_OMP_PARK)
            delivery.deliver(records)
            steps.append(time.perf_counter() - t)
            drain(delivery)
        forward = (sum(timings["execute (forward + metadata)"])
                   - sum(timings["metadata tensors (eager path)"])) / args.steps
        step = sum(steps) / args.steps
        row = {k: 1e3 * sum(v) / args.steps for k, v in timings.items()}
        row["step"] = 1e3 * step
        row["forward"] = 1e3 * forward
        row["host (step - forward)"] = 1e3 * (step - forward)
        row["host without argmax"] = (row["host (step - forward)"] - row.get("argmax (on the device on CUDA)", 0.0)
                                      - row.get("argmax + logprob (on the device on CUDA)", 0.0))
        rounds.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()), flush=True)
        for req_id in list(delivery.requests):
            delivery.cancel(delivery.requests[req_id][0].request)
    for key in rounds[0]:
        vals = [x[key] for x in rounds]
        print(f"{key}: median {statistics.median(vals):.2f} ms, min {min(vals):.2f} ms")
    print(f"({args.seqs} decoding sequences of {len(prompt)} prompt tokens, torch threads {torch.get_num_threads()})")
    pipe.close()


if __name__ == "__main__":
    main()
