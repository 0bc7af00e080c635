"""Load test for a running server: N concurrent streaming clients, a fixed number of requests, a target rate.

Reports throughput, time to first token (TTFT) and inter-token latency (ITL) percentiles, the error
count (must be 0) and, on an hf_paged server, the KV blocks still referenced once every request has
ended (must be 0; read from ``/engine/stats``). Exits non-zero when either is not 0.

    hf-paged serve --port 8080 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8080 --requests 128 --concurrency 32 --rate 8
    python benchmarks/serve_load.py --url ... --route chat --json > load.json
    python benchmarks/serve_load.py --url ... --route chat --prompts B --model NAME   # any OpenAI server

Any TGI-compatible server works (``--route generate`` uses ``/generate_stream``, ``--route chat``
uses ``/v1/chat/completions``); the leak check is skipped where ``/engine/stats`` does not exist.

``--chaos`` measures what hostile traffic costs the good requests: interleaved rounds (``--rounds``)
of the same good load alone and with ``--chaos-clients`` clients sending (``--chaos-rate`` per second
in all, Poisson arrivals; ``inf`` sends back to back, a flood), malformed
and out-of-range requests, lone surrogates, oversized bodies, over-long inputs, ``n`` above the limit
and streams they drop after two tokens. It reports p99 latency of the good requests in each round
with and without chaos, their ratio (target <= 1.2), and the slowest ``/health`` answer seen (by this
client's busy event loop: ``health_probe.py`` measures the server's own).

    python benchmarks/serve_load.py --url http://127.0.0.1:8080 --chaos --rounds 3 --json

``--constrained 0.5`` runs interleaved rounds of the load with every request free and with half of
them constrained to a mid-sized JSON schema (``SCHEMA``), and reports the throughput ratio and the
p99 inter-token latency of the unconstrained requests in both.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "Explain how a bicycle stays upright.", "Write a haiku about the sea.", "What is a prime number?",
    "List three uses of copper.", "Summarise the plot of Cinderella.", "How do vaccines work?",
    "Give me a recipe for pancakes.", "Why is the sky blue?", "Describe a busy train station.",
    "What does a compiler do?", "Name the planets of the solar system.", "Tell me a joke about cats.",
]


# A mid-sized schema for --constrained: nested object, array, enum, bounded numbers and strings.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    "author": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                "country": {"enum": ["FR", "DE", "US", "JP", "other"]}},
               "required": ["name", "country"]},
    "summary": {"type": "string", "maxLength": 120}},
    "required": ["title", "rating", "tags", "author", "summary"]}


@dataclass(slots=True)
class Sample:
    constrained: bool = False
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float | None = None
    tokens: int = 0  # streamed chunks that carried a token
    usage_tokens: int | None = None  # completion_tokens of the chat route's usage chunk, where one came


async def one_request(client: httpx.AsyncClient, route: str, prompt: str | list[dict], max_new_tokens: int,
                      constrained: bool = False, model: str | None = None) -> Sample:
    if route == "chat":
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        # The usage chunk counts the tokens exactly (a server may stream a chunk that holds two, or none).
        path, body = "/v1/chat/completions", {"messages": messages, "stream": True, "max_tokens": max_new_tokens,
                                             "temperature": 0, "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}}
    else:
        path, body = "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}
        if constrained:
            body["parameters"]["grammar"] = {"type": "json", "value": SCHEMA}
    s = Sample(constrained=constrained)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                data = json.loads(line[5:])
                if "error" in data:
                    s.error = str(data["error"])[:200]
                    return s
                if route == "chat" and data.get("usage"):
                    s.usage_tokens = data["usage"].get("completion_tokens")
                if route == "chat" and not data.get("choices"):
                    continue  # the usage chunk
                now = time.perf_counter()
                if s.tokens == 0:
                    s.ttft = now - start
                else:
                    s.itl.append(now - last)
                last = now
                s.tokens += 1
        s.ok, s.latency = True, time.perf_counter() - start
    except (httpx.HTTPError, ValueError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    return s


def prompt_set(name: str, n: int) -> list:
    """``short``: PROMPTS (one-line questions); ``A``/``B``: chat_requests.py's sets (chat messages, chat route)."""
    if name == "short":
        return PROMPTS
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from chat_requests import chats, set_b_chats

    return chats() if name == "A" else set_b_chats(n)


async def engine_leak(client: httpx.AsyncClient, timeout: float) -> int | None:
    """KV blocks still referenced after all requests ended (None: not an hf_paged server)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = await client.get("/engine/stats")
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        stats = r.json()
        idle = stats["running"] == 0 and stats["waiting"] == 0
        if (idle and stats["blocks_used"] == 0) or time.monotonic() > deadline:
            return stats["blocks_used"]
        await asyncio.sleep(0.1)


def _chaos_requests(max_body: int) -> list[tuple[str, str, bytes | dict]]:
    """(label, path, body): raw bytes are sent as is with a JSON content type."""
    return [
        ("surrogate", "/generate", b'{"inputs": "hi \\ud800 there", "parameters": {"max_new_tokens": 4}}'),
        ("tiny_temperature", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 4, "temperature": 1e-38,
                                                                          "details": True}}),
        ("infinity", "/generate", b'{"inputs": "hi", "parameters": {"temperature": Infinity}}'),
        ("n_1000", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 1000}),
        ("bad_json", "/v1/completions", b'{"prompt": "x", '),
        ("deep_nesting", "/generate", b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("bad_role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}),
        ("too_many_tokens", "/generate", {"inputs": "word " * 20_000, "parameters": {"max_new_tokens": 4}}),
        ("huge_body", "/generate", b'{"inputs": "' + b"a" * (max_body + 1024) + b'"}'),
        ("long_stop", "/generate", {"inputs": "hi", "parameters": {"stop": ["x" * 100_000]}}),
        ("cancelled_stream", "/generate_stream", {"inputs": "Count to one hundred:",
                                                  "parameters": {"max_new_tokens": 200}}),
    ]


async def chaos_client(client: httpx.AsyncClient, stop: asyncio.Event, rng: random.Random, counts: dict,
                       max_body: int, rate: float) -> None:
    """Chaos requests one after another, Poisson-paced at ``rate`` per second (inf: back to back)."""
    reqs = _chaos_requests(max_body)
    while not stop.is_set():
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
            if stop.is_set():
                break
        label, path, body = rng.choice(reqs)
        try:
            if label == "cancelled_stream":
                async with client.stream("POST", path, json=body) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data:")
                        if seen >= 2:
                            break
                status = r.status_code
            elif isinstance(body, bytes):
                r = await client.post(path, content=body, headers={"content-type": "application/json"})
                status = r.status_code
            else:
                status = (await client.post(path, json=body)).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        counts[f"{label}:{status}"] = counts.get(f"{label}:{status}", 0) + 1


async def health_probe(client: httpx.AsyncClient, stop: asyncio.Event, worst: list[float]) -> None:
    """The slowest /health answer as this client sees it. Under a heavy load that includes this client's
    own event-loop lag (seconds at 256 streams on 2 shared cores); ``health_probe.py`` in a process of its
    own measures the server alone."""
    while not stop.is_set():
        t = time.perf_counter()
        await client.get("/health")
        worst[0] = max(worst[0], time.perf_counter() - t)
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace, chaos: bool = False, constrained: float = 0.0) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # Idle connections expire on the client well before the server's keep-alive timeout (uvicorn: 5 s), so a
    # request never goes out on a connection the server is closing at that moment.
    limits = httpx.Limits(max_connections=args.concurrency + 4, keepalive_expiry=args.keepalive_expiry)
    rng = random.Random(args.seed)
    prompts = prompt_set(args.prompts, args.requests)
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, timeout=args.timeout,
                                 limits=limits) as client:
        slots = asyncio.Semaphore(args.concurrency)
        # Poisson arrivals at --rate requests/s (all at once when the rate is infinite).
        arrivals, t = [], 0.0
        for _ in range(args.requests):
            arrivals.append(t)
            t += rng.expovariate(args.rate) if args.rate != float("inf") else 0.0
        begin = time.perf_counter()

        async def client_task(i: int) -> Sample:
            await asyncio.sleep(max(0.0, begin + arrivals[i] - time.perf_counter()))
            async with slots:
                # Every other request (by index) up to the fraction asked is constrained to SCHEMA.
                c = constrained > 0 and (i % round(1 / constrained) == 0)
                return await one_request(client, args.route, prompts[i % len(prompts)], args.max_new_tokens, c,
                                         args.model)

        stop, counts, worst = asyncio.Event(), {}, [0.0]
        side = [asyncio.ensure_future(health_probe(client, stop, worst))]
        if chaos:
            side += [asyncio.ensure_future(chaos_client(client, stop, random.Random(args.seed + k), counts,
                                                        args.max_body_bytes, args.chaos_rate / args.chaos_clients))
                     for k in range(args.chaos_clients)]
        samples = await asyncio.gather(*(client_task(i) for i in range(args.requests)))
        wall = time.perf_counter() - begin
        stop.set()
        await asyncio.gather(*side)
        leaked = await engine_leak(client, args.leak_timeout)
    out = summarize(samples, wall, leaked, args)
    out["health_worst_ms"] = round(worst[0] * 1000, 1)
    free = [x for smp in samples if smp.ok and not smp.constrained for x in smp.itl]
    out["itl_p99_unconstrained_ms"] = None if not free else round(_pct(free, 99) * 1000, 1)
    out["constrained_requests"] = sum(smp.constrained for smp in samples)
    if chaos:
        out["chaos"] = dict(sorted(counts.items()))
        out["chaos_5xx"] = sum(v for k, v in counts.items() if k.rsplit(":", 1)[1].startswith("5"))
    return out


async def chaos_rounds(args: argparse.Namespace) -> dict:
    """Interleaved rounds: the good load alone, then with chaos; p99 latency of good requests in each."""
    rounds = []
    for i in range(args.rounds):
        calm = await run(args)
        wild = await run(args, chaos=True)
        rounds.append({"round": i + 1, "calm": calm, "chaos": wild,
                       "p99_ratio": round(wild["latency_p99_ms"] / calm["latency_p99_ms"], 3)
                       if calm["latency_p99_ms"] and wild["latency_p99_ms"] else None})
    ratios = [r["p99_ratio"] for r in rounds if r["p99_ratio"] is not None]
    return {"chaos_rate": args.chaos_rate if args.chaos_rate != float("inf") else "inf",
            "chaos_clients": args.chaos_clients, "route": args.route, "requests": args.requests,
            "concurrency": args.concurrency, "max_new_tokens": args.max_new_tokens,
            "rounds": rounds, "p99_ratio_median": statistics.median(ratios) if ratios else None,
            "p99_ratio_min": min(ratios, default=None), "p99_ratio_max": max(ratios, default=None),
            "errors": sum(r["calm"]["errors"] + r["chaos"]["errors"] for r in rounds),
            "chaos_5xx": sum(r["chaos"]["chaos_5xx"] for r in rounds),
            "blocks_leaked": max((r["chaos"]["blocks_leaked"] or 0) for r in rounds)}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def summarize(samples: list[Sample], wall: float, leaked: int | None, args: argparse.Namespace) -> dict:
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    itl = [x for s in ok for x in s.itl]
    lat = [s.latency for s in ok]
    by_usage = bool(ok) and all(s.usage_tokens is not None for s in ok)
    tokens = sum(s.usage_tokens if by_usage else s.tokens for s in ok)
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    errors = [s.error for s in samples if not s.ok]
    return {
        "url": args.url, "route": args.route, "requests": args.requests, "concurrency": args.concurrency,
        "rate": args.rate if args.rate != float("inf") else "inf", "max_new_tokens": args.max_new_tokens,
        "ok": len(ok), "errors": len(errors), "error_examples": errors[:3], "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 2), "output_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": ms(_pct(ttft, 50)), "ttft_p99_ms": ms(_pct(ttft, 99)),
        "itl_p50_ms": ms(_pct(itl, 50)), "itl_p99_ms": ms(_pct(itl, 99)),
        "latency_p50_ms": ms(_pct(lat, 50)), "latency_p99_ms": ms(_pct(lat, 99)),
        "mean_tokens_per_request": round(tokens / len(ok), 1) if ok else None,
        "tokens_counted_by": "usage" if by_usage else "chunks", "prompts": args.prompts,
        "blocks_leaked": leaked,
    }


def markdown(r: dict) -> str:
    rows = [("requests ok / errors", f"{r['ok']} / {r['errors']}"), ("wall time", f"{r['wall_s']} s"),
            ("throughput", f"{r['requests_per_s']} req/s, {r['tokens_per_s']} tok/s"),
            ("TTFT p50 / p99", f"{r['ttft_p50_ms']} / {r['ttft_p99_ms']} ms"),
            ("ITL p50 / p99", f"{r['itl_p50_ms']} / {r['itl_p99_ms']} ms"),
            ("latency p50 / p99", f"{r['latency_p50_ms']} / {r['latency_p99_ms']} ms"),
            ("tokens per request (mean)", str(r["mean_tokens_per_request"])),
            ("KV blocks leaked", "n/a (not hf_paged)" if r["blocks_leaked"] is None else str(r["blocks_leaked"]))]
    head = (f"{r['requests']} requests, {r['concurrency']} concurrent clients, rate {r['rate']} req/s, "
            f"max_new_tokens {r['max_new_tokens']}, route {r['route']} on {r['url']}\n\n")
    return head + "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


async def constrained_rounds(args: argparse.Namespace) -> dict:
    """Interleaved rounds: every request free, then a fraction constrained to SCHEMA."""
    rounds = []
    for i in range(args.rounds):
        free = await run(args)
        mixed = await run(args, constrained=args.constrained)
        rounds.append({"round": i + 1, "free": free, "mixed": mixed,
                       "throughput_ratio": round(mixed["tokens_per_s"] / free["tokens_per_s"], 3),
                       "itl_p99_ratio": round(mixed["itl_p99_unconstrained_ms"] / free["itl_p99_unconstrained_ms"], 3)})
    med = lambda k: statistics.median(r[k] for r in rounds)  # noqa: E731
    return {"route": args.route, "requests": args.requests, "concurrency": args.concurrency,
            "max_new_tokens": args.max_new_tokens, "constrained": args.constrained, "rounds": rounds,
            "throughput_ratio_median": med("throughput_ratio"),
            "throughput_ratio_min": min(r["throughput_ratio"] for r in rounds),
            "itl_p99_ratio_median": med("itl_p99_ratio"), "itl_p99_ratio_max": max(r["itl_p99_ratio"] for r in rounds),
            "errors": sum(r["free"]["errors"] + r["mixed"]["errors"] for r in rounds)}


def chaos_markdown(r: dict) -> str:
    lines = ["| round | p99 latency alone (ms) | p99 latency with chaos (ms) | ratio | /health worst, chaos (ms) |",
             "|---|---|---|---|---|"]
    for x in r["rounds"]:
        lines.append(f"| {x['round']} | {x['calm']['latency_p99_ms']} | {x['chaos']['latency_p99_ms']} | "
                     f"{x['p99_ratio']} | {x['chaos']['health_worst_ms']} |")
    lines.append(f"\nratio median {r['p99_ratio_median']}, min {r['p99_ratio_min']}, max {r['p99_ratio_max']}; "
                 f"errors {r['errors']}, 5xx to chaos {r['chaos_5xx']}, KV blocks leaked {r['blocks_leaked']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16, help="clients (requests in flight at most)")
    ap.add_argument("--rate", type=float, default=float("inf"), help="target arrival rate, requests/s")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--route", choices=["generate", "chat"], default="generate")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--keepalive-expiry", type=float, default=1.0,
                    help="seconds the client keeps an idle connection (below the server's keep-alive timeout)")
    ap.add_argument("--leak-timeout", type=float, default=10.0, help="seconds to wait for the engine to go idle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", choices=["short", "A", "B"], default="short",
                    help="short: one-line questions; A / B: chat_requests.py's request sets (chat route only)")
    ap.add_argument("--model", default=None, help="the `model` field of chat requests (for servers that need it)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    ap.add_argument("--chaos", action="store_true", help="rounds of the load alone and with hostile traffic")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--constrained", type=float, default=0.0,
                    help="rounds of the load free and with this fraction of requests constrained to a JSON schema")
    ap.add_argument("--chaos-clients", type=int, default=4)
    ap.add_argument("--chaos-rate", type=float, default=4.0,
                    help="chaos requests per second over all chaos clients (inf: each sends back to back)")
    ap.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="the server's body limit (for 413s)")
    args = ap.parse_args(argv)
    if args.prompts != "short" and args.route != "chat":
        ap.error("--prompts A / B are chat message lists: use --route chat")
    if args.constrained:
        result = asyncio.run(constrained_rounds(args))
        print(json.dumps(result, indent=2))
        return 1 if result["errors"] else 0
    if args.chaos:
        result = asyncio.run(chaos_rounds(args))
        print(json.dumps(result, indent=2) if args.json else chaos_markdown(result))
        return 1 if result["errors"] or result["chaos_5xx"] or result["blocks_leaked"] else 0
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    if result["errors"]:
        print(f"errors: {result['error_examples']}", file=sys.stderr)
    return 1 if result["errors"] or result["blocks_leaked"] else 0


if __name__ == "__main__":
    sys.exit(main())
