"""Randomised differential checks of the HTTP APIs: every request streamed and not streamed gives the same
result, and the same again when all of them run at once.

Random valid requests to OpenAI's chat and completions routes and TGI's generate routes (n > 1, seeds,
temperature and top_p, penalties, stop strings, logprobs and top lists, TGI's details and top_n_tokens,
return_full_text, echo). Each one is sent alone twice, not streamed and streamed, and the streamed chunks
are put back together as a client would: text, finish reasons, stop reasons, logprobs, token ids. The
two must be equal (alone, both runs make the same steps). Then every streamed request is sent at once: a
greedy one must give its text again (a sampled one may move where float rounding puts a draw on a
boundary; its run alone is the reference for its own stream). No response may be a 5xx.

    python tests/server_diff.py --requests 60 [--seed 0]   # test_server_diff runs a few
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "é", "日本", "🙂", "Paris", "1", "2", "\n", "code", "def", "{", "}"]


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_requests(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    """``n`` random (route, body) pairs, without ``stream``."""
    out = []
    for _ in range(n):
        route = rng.choice(["/v1/chat/completions", "/v1/completions", "/generate"])
        sample = rng.random() < 0.5
        stop = [rng.choice(WORDS[:6] + ["e", " a", "t"])] if rng.random() < 0.3 else None
        if route == "/generate":
            p: dict = dict(max_new_tokens=rng.randint(1, 16), details=rng.random() < 0.7)
            if sample:
                p.update(do_sample=True, seed=rng.randrange(1000), temperature=rng.choice([0.7, 1.0]))
                if rng.random() < 0.5:
                    p["top_p"] = rng.choice([0.8, 0.95])
                if rng.random() < 0.3:
                    p["top_k"] = rng.choice([5, 40])
                if rng.random() < 0.2:
                    p["typical_p"] = 0.9
            if rng.random() < 0.3:
                p["repetition_penalty"] = rng.choice([1.1, 1.3])
            if p["details"] and rng.random() < 0.4:
                p["top_n_tokens"] = rng.randint(1, 4)
            if rng.random() < 0.2:
                p["return_full_text"] = True
            if stop:
                p["stop"] = stop
            if rng.random() < 0.15:
                p["grammar"] = rng.choice([{"type": "json", "value": ADD}, {"type": "regex", "value": "[a-z]{2,8}"}])
                p["max_new_tokens"] = 40
            out.append((route, {"inputs": _text(rng, 1, 12), "parameters": p}))
            continue
        body: dict = dict(max_tokens=rng.randint(1, 16), seed=rng.randrange(1000),
                          temperature=rng.choice([0.7, 1.0]) if sample else 0.0)
        if sample and rng.random() < 0.5:
            body["top_p"] = rng.choice([0.8, 0.95])
        if sample and rng.random() < 0.4:
            body["n"] = rng.randint(2, 3)
        if rng.random() < 0.3:
            body.update(frequency_penalty=rng.choice([-0.5, 0.5]), presence_penalty=rng.choice([0.0, 0.8]))
        if stop:
            body["stop"] = stop if rng.random() < 0.5 else stop[0]
        if route == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": _text(rng, 1, 12)}]
            roll = rng.random()
            if roll < 0.15:  # one call per answer keeps a random model's output finite
                body.update(tools=TOOLS, parallel_tool_calls=False, max_tokens=60, tool_choice=rng.choice(
                    ["auto", "required", "none", {"type": "function", "function": {"name": "add"}}]))
            elif roll < 0.3:
                body.update(max_tokens=60, response_format=rng.choice([
                    {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}]))
            if rng.random() < 0.4:
                body["logprobs"] = True
                if rng.random() < 0.5:
                    body["top_logprobs"] = rng.randint(1, 4)
        else:
            body["prompt"] = _text(rng, 1, 12)
            if rng.random() < 0.4:
                body["logprobs"] = rng.randint(0, 3)
            if rng.random() < 0.2:
                body["echo"] = True
        out.append((route, body))
    return out


def _sse(text: str) -> list[dict]:
    events = []
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            events.append(json.loads(line[5:]))
    return events


def plain(route: str, body: dict, resp: dict) -> dict:
    """What a non-streamed response says, in one shape for comparing."""
    if route == "/generate":
        d = resp.get("details") or {}
        return {"text": resp["generated_text"], "finish": d.get("finish_reason"),
                "tokens": [(t["id"], t["text"], round(t["logprob"], 4)) for t in d.get("tokens", [])],
                "top": [[t["id"] for t in step] for step in d.get("top_tokens") or []]}
    choices = {}
    for c in resp["choices"]:
        if route == "/v1/chat/completions":
            lps = c.get("logprobs") or {}
            choices[c["index"]] = {
                "text": c["message"]["content"] or "", "finish": c["finish_reason"],
                "stop_reason": c.get("stop_reason"),
                "logprobs": [(e["token"], round(e["logprob"], 4), [t["token"] for t in e.get("top_logprobs", [])])
                             for e in lps.get("content") or []],
                "calls": [(t["function"]["name"], json.loads(t["function"]["arguments"]))
                          for t in c["message"].get("tool_calls") or []]}
        else:
            lps = c.get("logprobs") or {}
            choices[c["index"]] = {
                "text": c["text"], "finish": c["finish_reason"], "stop_reason": c.get("stop_reason"),
                "logprobs": list(zip(lps.get("tokens") or [], [round(x, 4) if x is not None else None
                                                                for x in lps.get("token_logprobs") or []],
                                     lps.get("text_offset") or []))}
    return {"choices": choices, "usage": resp.get("usage", {}).get("completion_tokens")}


def streamed(route: str, body: dict, events: list[dict]) -> dict:
    """The same shape as :func:`plain`, put together from a stream's chunks as a client would."""
    if route == "/generate":
        p, last = body["parameters"], events[-1]
        toks = [e for e in events if e.get("token")] if p.get("details") else []  # details: the tokens, the reason
        return {"text": last.get("generated_text"),
                "finish": (last.get("details") or {}).get("finish_reason") if p.get("details") else None,
                "tokens": [(e["token"]["id"], e["token"]["text"], round(e["token"]["logprob"], 4)) for e in toks],
                "top": [[t["id"] for t in e.get("top_tokens") or []] for e in toks] if p.get("top_n_tokens") else []}
    choices: dict = {}
    usage = None
    for e in events:
        if e.get("usage"):
            usage = e["usage"]["completion_tokens"]
        for c in e.get("choices", []):
            ch = choices.setdefault(c["index"], {"text": "", "finish": None, "stop_reason": None, "logprobs": []})
            if route == "/v1/chat/completions":
                ch.setdefault("calls", [])
                ch["text"] += (c.get("delta") or {}).get("content") or ""
                for d in (c.get("delta") or {}).get("tool_calls") or []:
                    ch["calls"].append((d["function"]["name"], json.loads(d["function"]["arguments"])))
                for entry in (c.get("logprobs") or {}).get("content") or []:
                    ch["logprobs"].append((entry["token"], round(entry["logprob"], 4),
                                           [t["token"] for t in entry.get("top_logprobs", [])]))
            else:
                ch["text"] += c.get("text") or ""
                lps = c.get("logprobs") or {}
                ch["logprobs"] += list(zip(lps.get("tokens") or [], [round(x, 4) if x is not None else None
                                                                     for x in lps.get("token_logprobs") or []],
                                           lps.get("text_offset") or []))
            if c.get("finish_reason") is not None:
                ch["finish"] = c["finish_reason"]
                ch["stop_reason"] = c.get("stop_reason")
    return {"choices": choices, "usage": usage}


def _send(client, route: str, body: dict, stream: bool):
    if route == "/generate":
        r = client.post("/generate_stream" if stream else "/generate", json=body)
    else:
        extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        r = client.post(route, json={**body, **extra})
    return r


def check(url: str, reqs: list[tuple[str, dict]]) -> list[str]:
    """The problems found (empty: every request agreed with itself, alone, streamed and at once)."""
    import httpx

    problems = []
    alone = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for i, (route, body) in enumerate(reqs):
            a = _send(c, route, body, False)
            b = _send(c, route, body, True)
            if a.status_code != 200 or b.status_code != 200:
                problems.append(f"request {i} {route} {body}: status {a.status_code} / {b.status_code}: {a.text[:200]}")
                alone.append(None)
                continue
            pa = plain(route, body, a.json())
            pb = streamed(route, body, _sse(b.text))
            if route == "/generate" and not body["parameters"].get("details"):
                pa["finish"] = None
            if pa != pb:
                problems.append(f"request {i} {route} {body}:\n      plain    {pa}\n      streamed {pb}")
            alone.append(pb)

    def one(i: int):
        route, body = reqs[i]
        with httpx.Client(base_url=url, timeout=300) as c:
            r = _send(c, route, body, True)
        return r.status_code, (streamed(route, body, _sse(r.text)) if r.status_code == 200 else r.text[:200])

    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(one, range(len(reqs))))
    for i, ((route, body), ref, (status, got)) in enumerate(zip(reqs, alone, together)):
        if status != 200:
            problems.append(f"request {i} {route} at once: status {status}: {got}")
        elif ref is not None and _greedy(route, body) and not _close(got, ref):
            problems.append(f"request {i} {route} {body} at once:\n      alone    {ref}\n      at once  {got}")
    return problems


def _close(a, b) -> bool:
    """Equal, floats (logprobs) to 1e-3: other batches round them differently."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-3
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def _greedy(route: str, body: dict) -> bool:
    if route == "/generate":
        return not body["parameters"].get("do_sample")
    return body.get("temperature") == 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from served import serving, tiny_chat_pipeline

    pipe = tiny_chat_pipeline(max_model_len=512, kv_memory="64MiB", max_num_seqs=16)
    try:
        with serving(pipe) as srv:
            problems = check(srv.url, make_requests(random.Random(args.seed), args.requests))
    finally:
        pipe.close()
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s) in {args.requests} requests")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
