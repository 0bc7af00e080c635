"""What Ray Serve's router costs, for the N-replica extrapolation in docs/scaling.md.

One replica of the app behind Ray's HTTP proxy against the same app served directly by uvicorn
(``hf-paged serve`` in a subprocess), same model and options, interleaved rounds:
- routed request rate: ``GET /health`` from ``--concurrency`` clients for ``--seconds`` (what the router
  and one replica can pass, with no generation);
- generation: ``--requests`` chat completions of ``--max-tokens`` tokens at ``--concurrency`` (tokens/s).

    python benchmarks/ray_router.py --model default --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _health_rate(url: str, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=30) as client:
        async def worker():
            nonlocal done
            while time.monotonic() < stop:
                r = await client.get(url + "/health")
                done += r.status_code == 200
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / seconds


async def _generation(url: str, requests: int, concurrency: int, max_tokens: int) -> float:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from chat_requests import chats

    msgs = chats()
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i):
            nonlocal tokens
            async with sem:
                r = await client.post(url + "/v1/chat/completions", json={
                    "messages": msgs[i % len(msgs)], "max_tokens": max_tokens, "temperature": 0})
                tokens += r.json()["usage"]["completion_tokens"]
        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return tokens / (time.perf_counter() - t)


def _wait(url: str, proc=None) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import ray
    from ray import serve

    from hf_paged import serve_ray

    engine = {"kv_memory": "256MiB", "max_num_seqs": 32}
    direct_port, ray_port = _port(), _port()
    direct = subprocess.Popen([sys.executable, "-m", "hf_paged.server", "--model", args.model, "--port",
                               str(direct_port), "--no-ui", "--kv-memory", "256MiB", "--max-num-seqs", "32",
                               "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rounds = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": ray_port})
        serve_ray.serve_ray(args.model, num_replicas=1, engine=engine, ray_actor_options={"num_cpus": 1})
        urls = {"direct": f"http://127.0.0.1:{direct_port}", "ray": f"http://127.0.0.1:{ray_port}"}
        _wait(urls["direct"], direct)
        _wait(urls["ray"])
        for r in range(args.rounds):
            row = {}
            for kind in (["direct", "ray"] if r % 2 == 0 else ["ray", "direct"]):
                row[f"{kind}_health_per_s"] = asyncio.run(_health_rate(urls[kind], args.concurrency, args.seconds))
                row[f"{kind}_tok_s"] = asyncio.run(_generation(urls[kind], args.requests, args.concurrency,
                                                               args.max_tokens))
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        direct.terminate()
        direct.wait(30)
    for key in rounds[0]:
        print(f"{key}: median {statistics.median(x[key] for x in rounds):.1f}, "
              f"min {min(x[key] for x in rounds):.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "concurrency": args.concurrency, "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
    main()
