"""Tensor parallel on CPU, for the record: W gloo ranks of 1 thread each against 1 process using every core.

The default model (SmolLM2-135M-Instruct, fp32) on the chats of benchmarks/chat_requests.py, eos mode
(each request stops at its EOS or max_new_tokens). SmolLM2 has 9 attention heads and 3 KV heads, so
its only tensor-parallel split is 3 ranks (``--world 3``); ``--model`` takes another folder. Rounds
alternate single / TP; rank 0 times ``generate()``; each rank reports its peak RSS. The TP outputs are
compared with the single-process ones token for token.

    python benchmarks/tp_cpu.py --rounds 3 --world 3
    python benchmarks/tp_cpu.py --dry-run          # 4 requests, 8 tokens, 1 round
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _requests(tok, n: int):
    from chat_requests import chats

    return [chats()[i % 64] for i in range(n)]


def _run(model: str, n: int, max_new: int, tp: bool) -> dict:
    import hf_paged

    pipe = hf_paged.PagedPipeline.from_pretrained(model, tp_plan="auto" if tp else None, kv_memory="256MiB",
                                                  max_num_seqs=64, max_batch_tokens=1024)
    reqs = _requests(pipe.tokenizer, n)
    pipe.generate(reqs[:2], max_new_tokens=4, progress=False)  # warm up (kernels built, threads started)
    t = time.perf_counter()
    outs = pipe.generate(reqs, max_new_tokens=max_new, do_sample=False, progress=False)
    secs = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in outs)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pipe.close()  # on every rank: rank 0 sends the stop the others wait for
    return {"tok_s": tokens / secs, "tokens": tokens, "rss_mib": rss, "ids": [o.token_ids for o in outs]}


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    Path(out, f"{rank}.json").write_text(json.dumps(_run(args.model, args.num_requests, args.max_new_tokens, True)))


def _tp_round(args: argparse.Namespace, tmp: Path) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(args.world, port, args, str(tmp)), nprocs=args.world, start_method="spawn")
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(args.world)]


def _single_round(args: argparse.Namespace, tmp: Path) -> dict:
    import subprocess

    code = (f"import sys, json, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"torch.set_num_threads({args.single_threads}); import tp_cpu; "
            f"print(json.dumps(tp_cpu._run({args.model!r}, {args.num_requests}, {args.max_new_tokens}, False)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--world", type=int, default=3)
    ap.add_argument("--single-threads", type=int, default=os.cpu_count(), help="threads of the 1-process run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.dry_run:
        args.rounds, args.num_requests, args.max_new_tokens = 1, 4, 8
    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            order = ["single", "tp"] if r % 2 == 0 else ["tp", "single"]
            row: dict = {}
            for kind in order:
                if kind == "single":
                    row["single"] = _single_round(args, Path(tmp))
                else:
                    row["tp"] = _tp_round(args, Path(tmp))
            same = sum(a == b for a, b in zip(row["single"]["ids"], row["tp"][0]["ids"]))
            rounds.append({"single_tok_s": row["single"]["tok_s"], "single_rss_mib": row["single"]["rss_mib"],
                           "tp_tok_s": row["tp"][0]["tok_s"], "tp_rss_mib": [x["rss_mib"] for x in row["tp"]],
                           "tokens": row["single"]["tokens"], "equal_requests": same,
                           "requests": args.num_requests})
            x = rounds[-1]
            print(f"round {r + 1}: 1 process x {args.single_threads} threads {x['single_tok_s']:.1f} tok/s "
                  f"(RSS {x['single_rss_mib']:.0f} MiB); {args.world} ranks x 1 thread {x['tp_tok_s']:.1f} tok/s "
                  f"(RSS per rank {', '.join(f'{m:.0f}' for m in x['tp_rss_mib'])} MiB); "
                  f"{same}/{args.num_requests} requests token-identical", flush=True)
    ratio = [x["tp_tok_s"] / x["single_tok_s"] for x in rounds]
    print(f"TP / single: median {statistics.median(ratio):.3f}, min {min(ratio):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"world": args.world, "model": args.model, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
