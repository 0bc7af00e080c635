"""Host time per decode step of two checkouts, in one process, in alternating turns (an A/B for host code).

This machine's speed drifts by up to 1.8x from one second to the next, so two processes timed one after the
other cannot show a 10% change in host code. Here both trees run in the same process: the other checkout's
``hf_paged`` is imported under another name (``hf_paged_base``), each tree gets its own engine with the same
tiny model and requests, and they take turns of ``--steps`` steps, so both see the same moments of the
machine. The forward is stubbed out (the model body returns zeros and the fused greedy head returns fixed
tokens), so a step's time is its host time alone: schedule, plan and metadata, sampling bookkeeping,
recording and delivery. With ``--forward`` the real forward runs and its thread time (the model body and
the fused head) is subtracted: slower to run, but the host work then meets caches as cold as in a real
run. Each turn reports the median of its steps' thread CPU times; each round pairs one turn of each tree.

    git worktree add /tmp/base <rev>
    python benchmarks/host_ab.py --base /tmp/base [--seqs 256] [--prompt-len 1024] [--rounds 12] [--steps 30]
                                [--forward]

Both trees must take the same C++ sources (the compiled ops are loaded once and shared). Each tree wraps its
own copy of the model (own KV pool, allocator and hooks), but transformers' attention registry is global:
the tree wrapped last names the "hf_paged" attention function for both, which only the (subtracted or
stubbed) forward calls. The numbers are
host time with warm caches unless ``--forward``; ``host_overhead.py`` (one tree, wall time) gives the
absolute figure, this the ratio.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _import_base(path: Path):
    """The checkout at ``path``'s package, as ``hf_paged_base`` (its imports within the package are relative)."""
    tmp = Path(tempfile.mkdtemp(prefix="hf_paged_ab_"))
    shutil.copytree(path / "hf_paged", tmp / "hf_paged_base", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("hf_paged_base")


def _engine(pkg, model, tok, args):
    """An engine of package ``pkg`` with ``args.seqs`` greedy sequences decoding, forward stubbed."""
    pipeline = importlib.import_module(pkg.__name__ + ".engine.pipeline")
    params_mod = importlib.import_module(pkg.__name__ + ".engine.params")
    request_mod = importlib.import_module(pkg.__name__ + ".engine.request")
    cpu = importlib.import_module(pkg.__name__ + ".kernels.cpu")
    pipe = pipeline.PagedPipeline(model, tok, max_model_len=args.prompt_len + 4096, max_num_seqs=args.seqs,
                                  max_batch_tokens=4096,
                                  kv_memory=f"{256 + args.seqs * (args.prompt_len + 4096) // 1024}MiB")
    eng, delivery = pipe.engine, pipe.delivery
    prompt = tok("Tell me a long story about a lighthouse keeper.")["input_ids"]
    prompt = (prompt * (args.prompt_len // len(prompt) + 1))[: args.prompt_len]
    for i in range(args.seqs):
        params = params_mod.SamplingParams.from_request(None, max_new_tokens=100_000, do_sample=False, ignore_eos=True)
        delivery.add(request_mod.Request(f"r-{i}", prompt, prompt, params, lambda req: None))
    while any(s.num_computed < s.num_prompt for s in eng.scheduler.running) or eng.scheduler.waiting:
        delivery.deliver(eng.step())
    if eng.runner.head is None:
        raise SystemExit(f"{pkg.__name__}: no fused greedy head (is the C++ extension built?)")
    base, head, vocab = eng.runner.head
    hidden = head.weight.shape[1]
    if args.forward:
        # The real forward, timed: the model body and the fused head's product and argmax.
        argmax = cpu.head_argmax

        def timed_base(*a, **k):
            t = time.thread_time()
            try:
                return base(*a, **k)
            finally:
                pipe.forward_s += time.thread_time() - t

        def timed_argmax(*a):
            t = time.thread_time()
            try:
                return argmax(*a)
            finally:
                pipe.forward_s += time.thread_time() - t

        eng.runner.head = (timed_base, head, vocab)
        cpu.head_argmax = timed_argmax
        return pipe
    # Ordinary text tokens (the prompt's), so that delivery decodes real text.
    tokens = torch.tensor((prompt * (args.seqs // len(prompt) + 1))[: args.seqs])

    def stub_base(input_ids=None, **_):
        return (torch.zeros(1, input_ids.shape[1], hidden),)

    eng.runner.head = (stub_base, head, vocab)
    cpu.head_argmax = lambda h, *_: (tokens[: h.shape[0]].clone(), None)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30, help="steps per turn")
    ap.add_argument("--json", type=Path, help="append this run's rounds to this JSON list")
    ap.add_argument("--forward", action="store_true", help="keep the real forward and subtract its time (the "
                    "forward evicts the host's data from the caches between steps, as in a real run)")
    args = ap.parse_args()

    import hf_paged
    import hf_paged.kernels.cpu as cpu_new
    from served import tiny_chat_pipeline

    if not cpu_new.available():
        raise SystemExit("the C++ extension is not available here")
    base_pkg = _import_base(args.base.resolve())
    # The compiled ops are registered once per process: the base tree uses the ones already loaded.
    importlib.import_module("hf_paged_base.kernels.cpu")._state.update(ok=True)
    from hf_paged.engine.host_runtime import park_openmp_workers
    from host_overhead import drain  # this folder is the script's, so on the path

    seed = tiny_chat_pipeline(max_model_len=args.prompt_len + 4096)
    model, tok = seed.model, seed.tokenizer
    seed.close()
    hf_paged.unwrap(model)
    # One model each: a model wrapped once keeps its KV pool and allocator, which the other tree's wrap would
    # then reuse (its allocator code included).
    trees = {"base": _engine(base_pkg, copy.deepcopy(model), tok, args),
             "new": _engine(hf_paged, copy.deepcopy(model), tok, args)}
    for name, pkg in (("base", base_pkg), ("new", hf_paged)):
        alloc = type(trees[name].engine.pool.allocator)
        if not alloc.__module__.startswith(pkg.__name__ + "."):
            raise SystemExit(f"{name}: the allocator comes from {alloc.__module__}")
    turns: dict[str, list[float]] = {k: [] for k in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            eng, delivery = trees[name].engine, trees[name].delivery
            times = []
            for _ in range(args.steps):
                trees[name].forward_s = 0.0
                t = time.thread_time()
                records = eng.step()
                park_openmp_workers()
                delivery.deliver(records)
                times.append(time.thread_time() - t - trees[name].forward_s)
                drain(delivery)
            turns[name].append(1e3 * statistics.median(times))
        print(f"round {r + 1}: base {turns['base'][-1]:.3f} ms, new {turns['new'][-1]:.3f} ms, "
              f"new/base {turns['new'][-1] / turns['base'][-1]:.3f}", flush=True)
    ratios = [n / b for n, b in zip(turns["new"], turns["base"])]
    for name, v in turns.items():
        print(f"{name}: median {statistics.median(v):.3f} ms, min {min(v):.3f} ms")
    print(f"new/base per round: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
          f"max {max(ratios):.3f} ({args.seqs} sequences of {args.prompt_len} prompt tokens, "
          f"{args.steps} steps a turn)")
    if args.json:
        row = {"seqs": args.seqs, "prompt_len": args.prompt_len, "steps_per_turn": args.steps,
               "forward": args.forward, "base": str(args.base), "base_ms": turns["base"], "new_ms": turns["new"],
               "ratio_median": statistics.median(ratios), "date": time.strftime("%Y-%m-%d")}
        old = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(old + [row], indent=1))
    for pipe in trees.values():
        pipe.close()


if __name__ == "__main__":
    main()
