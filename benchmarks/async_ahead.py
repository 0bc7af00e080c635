"""How often async scheduling runs ahead when a batch mixes requests that read their history: the share of
decode steps planned while the previous step's tokens were still in flight (the rest waited for the host).
On CUDA every step that waits leaves the device idle for the host's scheduling, planning and delivery.

    python benchmarks/async_ahead.py [--requests 32] [--max-new-tokens 48]

Runs on CPU (the loop's structure is the same there): a tiny chat model with the default tokenizer, async
scheduling forced on, one mix per row of the table: all plain; one JSON-schema request among plain ones; a
quarter with repetition/frequency penalties; a quarter with n-gram bans; everything mixed. Also counts the
steps that recorded the step in flight between their forward and their sampling (grammar, n-gram rows).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


def mix(name: str, i: int) -> dict:
    if name == "one JSON schema" and i == 0 or name == "mixed" and i % 4 == 0:
        return dict(json_schema=SCHEMA)
    if name == "penalties, 1/4" and i % 4 == 0 or name == "mixed" and i % 4 == 1:
        return dict(repetition_penalty=1.1, frequency_penalty=0.2, ignore_eos=True)
    if name == "n-gram bans, 1/4" and i % 4 == 0 or name == "mixed" and i % 4 == 2:
        return dict(no_repeat_ngram_size=3, ignore_eos=True)
    return dict(ignore_eos=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    from served import tiny_chat_pipeline

    print("| mix | decode steps | planned ahead | recorded between forward and sampling |\n|---|---|---|---|")
    for name in ("plain", "one JSON schema", "penalties, 1/4", "n-gram bans, 1/4", "mixed"):
        pipe = tiny_chat_pipeline(max_model_len=512, kv_memory="64MiB", max_num_seqs=args.requests,
                                  async_scheduling=True)
        eng = pipe.engine
        fills: list[int] = []
        early: list[bool] = []
        real_exec = eng.runner.execute
        eng.runner.execute = lambda plan, prev=None: fills.append(
            (len(plan.fill or ()), all(q == 1 for q in plan.q_lens))) or real_exec(plan, prev)
        if hasattr(eng, "needs_tokens"):
            real_needs = eng.needs_tokens
            eng.needs_tokens = lambda fwd: early.append(real_needs(fwd)) or early[-1]
        try:
            handles = [pipe.submit([{"role": "user", "content": f"Request {i}: say something."}],
                                   max_new_tokens=args.max_new_tokens, seed=i, **mix(name, i))
                       for i in range(args.requests)]
            for h in handles:
                h.result(timeout=600)
        finally:
            pipe.close()
        decode = [f for f, only_decode in fills if only_decode]
        ahead = sum(f > 0 for f in decode)
        print(f"| {name} | {len(decode)} | {ahead} ({ahead / max(len(decode), 1):.0%}) | {sum(early)} |", flush=True)


if __name__ == "__main__":
    main()
