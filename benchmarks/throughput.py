"""Generation throughput: PagedPipeline vs HF generate() (one at a time, padded static batches),
transformers' continuous batching (generate_batch) and vLLM's CPU build, on the same chat requests.

    python benchmarks/throughput.py --mode eos   --max-new-tokens 256 --out results/throughput_eos.json
    python benchmarks/throughput.py --mode fixed --max-new-tokens 128 --out results/throughput_fixed.json
    python benchmarks/throughput.py --systems paged,hf_static --vllm-python /path/to/vllm-venv/bin/python

Each system runs in its own subprocess (fresh process: its peak RSS is its own). Greedy, fp32, the
default model unless --model. Outputs are compared token for token with HF one-at-a-time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALL = ["paged", "paged_compile", "hf_single", "hf_static", "hf_cb", "vllm"]


def build_prompts(tok, n: int, which: str = "A") -> list[list[int]]:
    sys.path.insert(0, str(HERE))
    from chat_requests import chats, set_b_chats

    cs = chats() if which == "A" else set_b_chats(n)
    cs = (cs * (n // len(cs) + 1))[:n]
    out = []
    for c in cs:
        ids = tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    """Run one system in this process and print its JSON result."""
    import torch

    torch.set_num_threads(args.threads)
    from hf_paged.models import ensure_default_model, load_model

    path = str(ensure_default_model()) if args.model == "default" else args.model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prompts = build_prompts(tok, args.num_requests, args.set)
    if args.system == "hf_single":
        prompts = prompts[: args.single_limit]
    fixed = args.mode == "fixed"
    eos = [] if fixed else [tok.eos_token_id]
    outputs: list[list[int]] = []
    if args.system == "vllm":
        from vllm import LLM, SamplingParams

        # On CPU, vLLM's "gpu" memory utilisation is a fraction of RAM; the KV space is set in GiB.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(_gib(args.kv_memory)))))
        llm = LLM(model=path, dtype=args.dtype, max_model_len=4096, seed=0, gpu_memory_utilization=0.3,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batch_tokens)
        sp = SamplingParams(temperature=0.7 if args.sample else 0.0, top_k=50 if args.sample and not args.top_p else -1,
                            top_p=args.top_p or 1.0, max_tokens=args.max_new_tokens, ignore_eos=fixed)
        t0 = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        outputs = [list(r.outputs[0].token_ids) for r in res]
    else:
        model, _ = load_model(path, dtype=getattr(torch, args.dtype))
        gen_kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
        if args.sample:
            gen_kw.update(_sampling(args))
        if fixed:
            gen_kw["min_new_tokens"] = args.max_new_tokens
        if args.system in ("paged", "paged_compile"):
            from hf_paged.engine.pipeline import PagedPipeline

            pipe = PagedPipeline(model, tok, kv_memory=args.kv_memory, max_num_seqs=args.max_num_seqs,
                                 max_batch_tokens=args.max_batch_tokens, compile=args.system == "paged_compile")
            pipe.generate(prompts[:2], max_new_tokens=4, progress=False)  # warm-up
            t0 = time.perf_counter()
            res = pipe.generate(prompts, progress=False, ignore_eos=fixed, **gen_kw)
            elapsed = time.perf_counter() - t0
            graphs = pipe.engine.runner.graphs
            if args.system == "paged_compile" and (graphs is None or graphs._compiled is None):
                raise SystemExit("paged_compile: the compiled decode path fell back to eager (see the warning)")
            outputs = [r.token_ids for r in res]
            pipe.close()
        elif args.system == "hf_single":
            model.generate(torch.tensor([prompts[0]]), max_new_tokens=4)
            t0 = time.perf_counter()
            for p in prompts:
                out = model.generate(torch.tensor([p]), **gen_kw)
                outputs.append(out[0, len(p):].tolist())
            elapsed = time.perf_counter() - t0
        elif args.system == "hf_static":
            tok.padding_side = "left"
            t0 = time.perf_counter()
            for i in range(0, len(prompts), args.static_batch):
                chunk = prompts[i:i + args.static_batch]
                width = max(map(len, chunk))
                pad = tok.pad_token_id
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
                out = model.generate(input_ids=ids, attention_mask=mask, **gen_kw)
                for row in out[:, width:].tolist():
                    outputs.append(_trim(row, eos, pad if not fixed else None))
            elapsed = time.perf_counter() - t0
        elif args.system == "hf_cb":
            from transformers import GenerationConfig

            cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                   **(_sampling(args) if args.sample else {}),
                                   eos_token_id=None if fixed else tok.eos_token_id, pad_token_id=tok.pad_token_id)
            t0 = time.perf_counter()
            res = model.generate_batch(inputs=prompts, generation_config=cfg)
            elapsed = time.perf_counter() - t0
            outputs = [res[k].generated_tokens for k in sorted(res, key=lambda k: int(k.split("_")[-1]))]
    n_tokens = sum(len(o) for o in outputs)
    print("RESULT " + json.dumps({"system": args.system, "requests": len(prompts), "tokens": n_tokens,
                                  "seconds": elapsed, "tokens_per_s": n_tokens / elapsed,
                                  "peak_rss_mib": peak_rss_mib(), "outputs": outputs}))


def _sampling(args) -> dict:
    """--sample's settings: temperature 0.7 with top_k 50, or with --top-p (and no top-k, as OpenAI's and TGI's
    clients send)."""
    return dict(temperature=0.7, top_k=0, top_p=args.top_p) if args.top_p else dict(temperature=0.7, top_k=50)


def _gib(size: str) -> float:
    from hf_paged.kv.pool import parse_bytes

    return parse_bytes(size) / 2**30


def _trim(row: list[int], eos: list[int], pad: int | None) -> list[int]:
    """A padded-batch row up to and including its EOS (HF pads finished rows)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="paged,hf_single,hf_static,hf_cb,vllm")
    ap.add_argument("--mode", choices=["eos", "fixed"], default="eos")
    ap.add_argument("--set", choices=["A", "B"], default="A",
                    help="A: benchmarks/chat_requests.py; B: other prompts (short tasks, random-word notes)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights and KV cache dtype, for every system (vLLM included)")
    ap.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top_k 50) instead of greedy; "
                    "outputs then differ between systems")
    ap.add_argument("--top-p", type=float, default=None, help="with --sample: top_p P and no top-k instead of top_k "
                    "50 (what OpenAI and TGI clients send)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--single-limit", type=int, default=16, help="HF one-at-a-time runs only this many")
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=1024)
    ap.add_argument("--kv-memory", default="1GiB")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"), help="python of a venv with vllm")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds; each round runs every system once, in turn, so machine drift hits all alike")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-json", default=None, help="re-print the report (and --plot) of a saved --out file")
    ap.add_argument("--worker", dest="system", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.top_p is not None and not args.sample:
        ap.error("--top-p needs --sample")
    if args.system:
        return worker(args)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for key in ("mode", "max_new_tokens", "num_requests"):
            setattr(args, key, saved["args"][key])
        args.out = None
        return report(saved["results"], args, saved.get("rounds"))

    rounds: list[dict] = []
    for rnd in range(args.repeat):
        results = {}
        for system in args.systems.split(","):
            py = sys.executable
            if system == "vllm":
                if not args.vllm_python:
                    print("vllm: skipped (no --vllm-python)")
                    continue
                py = args.vllm_python
            cmd = [py, __file__, "--worker", system] + [a for a in sys.argv[1:] if a != "--worker"]
            print(f"round {rnd + 1}/{args.repeat}: running {system} ...", flush=True)
            env = dict(os.environ, PYTHONPATH=str(HERE.parent))
            stdout, stderr, peak = run_measured(cmd, env)
            line = next((l for l in stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{system} failed:\n{stderr[-3000:]}")
                continue
            results[system] = json.loads(line[7:])
            results[system]["peak_rss_mib"] = peak
            print(f"  {system}: {results[system]['tokens_per_s']:.1f} tokens/s", flush=True)
        rounds.append(results)
    results = _median_round(rounds)
    report(results, args, rounds)


def run_measured(cmd: list[str], env: dict) -> tuple[str, str, float]:
    """Run ``cmd``; return stdout, stderr and the peak RSS (MiB) summed over its process tree
    (vLLM runs its engine in child processes, so the worker's own RSS would undercount it)."""
    import tempfile

    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                procs = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)
        out.seek(0), err.seek(0)
        return out.read(), err.read(), peak / 2**20


def _median_round(rounds: list[dict]) -> dict:
    """Per system, the round with its median tokens/s (its outputs and RSS come along)."""
    out = {}
    for name in {n for r in rounds for n in r}:
        runs = sorted((r[name] for r in rounds if name in r), key=lambda x: x["tokens_per_s"])
        out[name] = dict(runs[(len(runs) - 1) // 2], tokens_per_s_runs=[x["tokens_per_s"] for x in runs])
    order = [n for r in rounds for n in r]
    return {n: out[n] for n in dict.fromkeys(order)}


def report(results: dict, args, rounds: list[dict] | None = None) -> None:
    ref = results.get("hf_single")
    base = ref["tokens_per_s"] if ref else None
    print(f"\nmode={args.mode} max_new_tokens={args.max_new_tokens} requests={args.num_requests}")
    print("| system | requests | gen tokens | tokens/s | x HF one-at-a-time | peak RSS MiB | greedy = HF |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        agree = "n/a"
        if ref:
            n = len(ref["outputs"])
            same = sum(a == b for a, b in zip(r["outputs"][:n], ref["outputs"]))
            agree = f"{same}/{n}"
        ratio = f"{r['tokens_per_s'] / base:.1f}" if base else "n/a"
        print(f"| {name} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.1f} | {ratio} | "
              f"{r['peak_rss_mib']:.0f} | {agree} |")
    rounds = rounds or [results]
    if len(rounds) > 1:
        print(f"\ntokens/s above: the median of {len(rounds)} rounds. Per round:")
        ours = [n for n in results if n.startswith("paged") and "vllm" in results]
        print("| round | " + " | ".join(results) + "".join(f" | {n} / vllm" for n in ours) + " |")
        print("|---|" + "---|" * (len(results) + len(ours)))
        ratios: dict[str, list[float]] = {n: [] for n in ours}
        for i, r in enumerate(rounds, 1):
            cells = [f"{r[n]['tokens_per_s']:.1f}" if n in r else "-" for n in results]
            for n in ours:
                ratio = r[n]["tokens_per_s"] / r["vllm"]["tokens_per_s"] if n in r and "vllm" in r else None
                if ratio is not None:
                    ratios[n].append(ratio)
                cells.append("-" if ratio is None else f"{ratio:.2f}")
            print(f"| {i} | " + " | ".join(cells) + " |")
        for n, vals in ratios.items():
            if vals:
                srt = sorted(vals)
                print(f"{n} / vllm per round: median {srt[(len(srt) - 1) // 2]:.2f}, min {srt[0]:.2f}, "
                      f"max {srt[-1]:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        slim = [{n: {k: v for k, v in x.items() if k != "outputs"} for n, x in r.items()} for r in rounds]
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "rounds": slim}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(results)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.barh(names, [results[n]["tokens_per_s"] for n in names], color="#3b7dd8",
                label=f"median of {len(rounds)} rounds" if len(rounds) > 1 else None)
        if len(rounds) > 1:  # every round as a dot on its system's bar
            for i, n in enumerate(names):
                runs = [r[n]["tokens_per_s"] for r in rounds if n in r]
                ax.plot(runs, [i] * len(runs), "o", color="black", ms=4,
                        label="one round" if i == 0 else None)
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("generated tokens / s (2-core CPU, fp32, greedy)")
        ax.set_title(f"SmolLM2-135M, {args.num_requests} chat requests, mode={args.mode}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
