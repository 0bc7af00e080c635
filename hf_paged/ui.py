"""The Gradio UI: streaming chat (optionally constrained to a JSON schema) plus a live view of the
engine and its KV block pool. Part of the package (``pip install hf-paged[demo]``).

Mounted at ``/ui`` by ``hf-paged serve`` (in-process client), or standalone against any TGI-compatible
server over HTTP::

    python -m hf_paged.ui --endpoint http://127.0.0.1:8080 [--api-key KEY] [--port 7860]
    python demos/gradio_app.py ...      # the same, from the repository

The chat streams from ``/v1/chat/completions`` (falling back to ``/generate_stream``). The engine panel
reads ``/engine/stats`` and ``/engine/blocks`` (hf_paged only); on another server it shows what
``/metrics`` offers, or says that nothing is available.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local demo

import gradio as gr  # noqa: E402
import httpx  # noqa: E402

COLORS = {"used": "#6366f1", "cached": "#14b8a6", "free": "#e2e8f0", "text": "#0f172a", "muted": "#64748b"}
MAX_CELLS = 1024  # beyond this many blocks each square stands for a group of blocks
IDLE_POLL_S = 0.05  # Gradio queue poll while idle (see queued())
# System fonts only: the default theme would pull web fonts from the internet.
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="teal", neutral_hue="slate",
                       font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = """
.hp-panel{font-family:ui-sans-serif,system-ui,sans-serif;color:#0f172a}
.hp-head{display:flex;align-items:center;gap:.5rem;margin-bottom:.6rem}
.hp-title{font-weight:650;font-size:1.05rem}.hp-model{color:#64748b;font-size:.85rem;margin-left:auto}
.hp-live{background:#dcfce7;color:#166534;border-radius:999px;padding:0 .5rem;font-size:.75rem}
.hp-cards{display:grid;grid-template-columns:repeat(3,1fr);gap:.5rem;margin-bottom:.8rem}
.hp-card{background:#f8fafc;border:1px solid #e2e8f0;border-radius:.6rem;padding:.45rem .6rem}
.hp-card b{display:block;font-size:1.25rem;font-variant-numeric:tabular-nums}
.hp-card span{color:#64748b;font-size:.75rem;text-transform:uppercase;letter-spacing:.04em}
.hp-sub{color:#64748b;font-size:.8rem;margin:.2rem 0 .35rem}
.hp-legend{display:flex;gap:1rem;font-size:.82rem;margin-top:.4rem;font-variant-numeric:tabular-nums}
.hp-legend i{display:inline-block;width:.8rem;height:.8rem;border-radius:3px;margin-right:.3rem;vertical-align:-1px}
.hp-note{color:#64748b;font-size:.85rem;padding:.6rem;border:1px dashed #cbd5e1;border-radius:.6rem}
"""


class HTTPEngineClient:
    """Talks to a TGI-compatible server; engine views degrade to None when the server lacks them."""

    def __init__(self, endpoint: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=endpoint.rstrip("/"), headers=headers, timeout=timeout)
        self.label = endpoint

    async def chat(self, messages: list[dict], *, temperature: float, top_p: float, max_new_tokens: int,
                   seed: int | None, json_schema: dict | None = None, adapter: str | None = None) -> AsyncIterator[str]:
        body = {"messages": messages, "stream": True, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed}
        if adapter is not None:
            body["model"] = adapter  # OpenAI's way to name a LoRA adapter
        if json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "ui", "schema": json_schema}}
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 404:
                await _raise_for(r)
                async for data in _sse(r):
                    if data == "[DONE]":
                        return
                    for choice in json.loads(data).get("choices", []):
                        yield choice.get("delta", {}).get("content") or ""
                return
        # A server without the OpenAI route: a plain transcript prompt on TGI's own stream route.
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        params = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0, "seed": seed,
                  "temperature": temperature or None, "top_p": top_p if top_p < 1 else None, "adapter_id": adapter}
        async with self.http.stream("POST", "/generate_stream", json={"inputs": prompt, "parameters": params}) as r:
            await _raise_for(r)
            async for data in _sse(r):
                yield json.loads(data)["token"]["text"]

    async def adapters(self) -> list[str]:
        """The LoRA adapters the server lists in /v1/models (the cards with a parent model)."""
        try:
            r = await self.http.get("/v1/models")
            return [m["id"] for m in r.json().get("data", []) if m.get("parent")] if r.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):
            return []

    async def stats(self) -> dict | None:
        try:
            r = await self.http.get("/engine/stats")
            if r.status_code == 200:
                return r.json()
            r = await self.http.get("/metrics")
            if r.status_code != 200:
                return None
        except httpx.HTTPError:
            return None
        from prometheus_client.parser import text_string_to_metric_families

        values = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
        if "tgi_batch_current_size" not in values:
            return None
        return {"running": int(values["tgi_batch_current_size"]), "waiting": int(values.get("tgi_queue_size", 0)),
                "engine": "tgi"}

    async def blocks(self) -> dict | None:
        try:
            r = await self.http.get("/engine/blocks")
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None


async def _raise_for(r: httpx.Response) -> None:
    if r.status_code >= 400:
        body = (await r.aread()).decode(errors="replace")
        try:
            body = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            pass
        raise RuntimeError(f"HTTP {r.status_code}: {body}")


async def _sse(r: httpx.Response) -> AsyncIterator[str]:
    async for line in r.aiter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            if data.startswith("{") and '"error"' in data[:12]:
                err = json.loads(data)["error"]
                raise RuntimeError(err.get("message") if isinstance(err, dict) else err)
            yield data


# ---------------------------------------------------------------------------- engine panel
def block_grid_svg(states: list[int]) -> str:
    """The pool as squares: one per block, or per group of blocks filled bottom-up (used, then cached)."""
    n = len(states)
    group = max(1, math.ceil(n / MAX_CELLS))
    cells = math.ceil(n / group)
    cols = max(8, min(48, math.ceil(math.sqrt(cells * 2.2))))
    size, gap = 12, 2
    rows = math.ceil(cells / cols)
    out = []
    for c in range(cells):
        chunk = states[c * group:(c + 1) * group]
        used, cached = chunk.count(1), chunk.count(2)
        x, y = (c % cols) * (size + gap), (c // cols) * (size + gap)
        first, last = c * group, c * group + len(chunk) - 1
        if group == 1:
            name = ("free", "used", "cached")[chunk[0]]
            out.append(f'<rect x="{x}" y="{y}" width="{size}" height="{size}" rx="2" fill="{COLORS[name]}">'
                       f"<title>block {first}: {name}</title></rect>")
            continue
        title = f"blocks {first}-{last}: {used} used, {cached} cached, {len(chunk) - used - cached} free"
        out.append(f'<g><title>{title}</title><rect x="{x}" y="{y}" width="{size}" height="{size}" rx="2" '
                   f'fill="{COLORS["free"]}"/>')
        h_used, h_cached = size * used / len(chunk), size * cached / len(chunk)
        if h_used:
            out.append(f'<rect x="{x}" y="{y + size - h_used:.2f}" width="{size}" height="{h_used:.2f}" '
                       f'fill="{COLORS["used"]}"/>')
        if h_cached:
            out.append(f'<rect x="{x}" y="{y + size - h_used - h_cached:.2f}" width="{size}" '
                       f'height="{h_cached:.2f}" fill="{COLORS["cached"]}"/>')
        out.append("</g>")
    w, h = cols * (size + gap) - gap, rows * (size + gap) - gap
    counts = f'data-used="{states.count(1)}" data-cached="{states.count(2)}" data-free="{states.count(0)}"'
    return (f'<svg id="kv-grid" viewBox="0 0 {w} {h}" width="100%" {counts} data-total="{n}" '
            f'data-group="{group}" xmlns="http://www.w3.org/2000/svg">{"".join(out)}</svg>')


def _sparkline(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    top = max(max(values), 1e-9)
    pts = " ".join(f"{i * 300 / (len(values) - 1):.1f},{38 - 34 * v / top:.1f}" for i, v in enumerate(values))
    return (f'<div class="hp-sub">Tokens/s, last {len(values) // 2} s (peak {top:.0f})</div>'
            f'<svg viewBox="0 0 300 40" width="100%" height="40" preserveAspectRatio="none">'
            f'<polyline points="{pts}" fill="none" stroke="{COLORS["used"]}" stroke-width="2" '
            f'stroke-linejoin="round" vector-effect="non-scaling-stroke"/></svg>')


def render_panel(stats: dict | None, blocks: dict | None, history: list[float] = ()) -> str:
    """The engine panel as HTML (stat cards, tokens/s sparkline, block grid with legend)."""
    if stats is None:
        return ('<div class="hp-panel"><div class="hp-note">Engine stats unavailable: this server exposes '
                "neither <code>/engine/stats</code> nor TGI's <code>/metrics</code>.</div></div>")
    card = lambda label, value: f'<div class="hp-card"><b>{value}</b><span>{label}</span></div>'  # noqa: E731
    cards = [card("Running", stats.get("running", "–")), card("Waiting", stats.get("waiting", "–"))]
    if "tokens_per_s" in stats:
        total = max(stats["blocks_total"], 1)
        # The engine's rate covers its last steps; an idle engine has no current rate.
        tps = stats["tokens_per_s"] if stats.get("running") else 0.0
        cards += [card("Tokens / s", f"{tps:.1f}"),
                  card("KV used", f"{100 * stats['blocks_used'] / total:.0f}%"),
                  card("Prefix hits", f"{100 * stats['prefix_hit_rate']:.0f}%"),
                  card("Preemptions", stats["preemptions"])]
    html = [f'<div class="hp-panel"><div class="hp-head"><span class="hp-title">Engine</span>'
            f'<span class="hp-live">live</span><span class="hp-model">{stats.get("model_id", stats.get("engine", ""))}'
            f'</span></div><div class="hp-cards">{"".join(cards)}</div>', _sparkline(list(history))]
    if blocks is not None:
        c = blocks["counts"]
        group = max(1, math.ceil(blocks["num_blocks"] / MAX_CELLS))
        unit = "one square per block" if group == 1 else f"one square per {group} blocks"
        html.append(f'<div class="hp-sub">KV block pool: {blocks["num_blocks"]} blocks of {blocks["block_size"]} '
                    f"tokens, {unit}</div>{block_grid_svg(blocks['states'])}")
        names = {"used": "in use", "cached": "cached prefix", "free": "free"}
        html.append('<div class="hp-legend">' + "".join(
            f'<span><i style="background:{COLORS[k]}"></i>{names[k]} <b>{c[k]}</b></span>' for k in names) + "</div>")
    elif "blocks_total" not in stats:
        html.append('<div class="hp-note">No KV block view: not an hf_paged server.</div>')
    return "".join(html) + "</div>"


# ---------------------------------------------------------------------------- the app
def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))  # Gradio's typed parts


ERROR_MARK = "\n\n**Error:** "  # how a failed reply shows its error in the chat


def model_turns(chat: list) -> list[dict]:
    """The chat as the model gets it: a reply's error text (ERROR_MARK on) is the UI's, not the model's; a turn
    whose reply failed before any text is left out with its question."""
    turns: list[dict] = []
    for m in chat:
        content = _text(m["content"])
        if m["role"] == "assistant" and ERROR_MARK in content:
            content = content.split(ERROR_MARK)[0]
            if not content:
                if turns and turns[-1]["role"] == "user":
                    turns.pop()
                continue
        turns.append({"role": m["role"], "content": content})
    return turns


BASE_MODEL = "(base model)"


def build_ui(client: Any, *, title: str = "hf_paged") -> gr.Blocks:
    """Chat + live engine view over ``client`` (``chat``/``stats``/``blocks`` coroutines)."""
    history_tps: deque[float] = deque(maxlen=120)
    last_sample = [0.0]

    def user_turn(message: str, chat: list) -> tuple[str, list]:
        if not message.strip():
            return message, chat
        return "", [*chat, {"role": "user", "content": message}]

    async def bot_turn(chat: list, system: str, temperature: float, top_p: float, max_new: float, seed: float,
                       schema: str = "", adapter: str = BASE_MODEL):
        if not chat or chat[-1]["role"] != "user":
            return
        msgs = ([{"role": "system", "content": system}] if system.strip() else [])
        msgs += model_turns(chat)
        chat = [{"role": m["role"], "content": _text(m["content"])} for m in chat]
        chat.append({"role": "assistant", "content": ""})
        try:
            json_schema = json.loads(schema) if schema and schema.strip() else None
            async for delta in client.chat(msgs, temperature=float(temperature), top_p=float(top_p),
                                           max_new_tokens=int(max_new), seed=None if seed is None or seed < 0
                                           else int(seed), json_schema=json_schema,
                                           adapter=None if adapter in (None, BASE_MODEL) else adapter):
                chat[-1]["content"] += delta
                yield chat
        except Exception as exc:  # shown in the chat: the demo must keep running
            chat[-1]["content"] += f"{ERROR_MARK}{exc}"
        yield chat

    async def adapter_choices():
        return gr.update(choices=[BASE_MODEL, *await client.adapters()])

    async def refresh() -> str:
        stats, blocks = await client.stats(), await client.blocks()
        now = time.monotonic()
        if stats is not None and "tokens_per_s" in stats and now - last_sample[0] >= 0.45:
            history_tps.append(float(stats["tokens_per_s"]) if stats.get("running") else 0.0)
            last_sample[0] = now
        return render_panel(stats, blocks, history_tps)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title} · continuous batching, paged KV cache\nServing from **{client.label}**. "
                    "Open this page in several tabs and chat at once: every reply shares one batch.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chat", height=430, label="Chat", show_label=False)
                with gr.Row():
                    msg = gr.Textbox(elem_id="msg", placeholder="Ask something…", show_label=False, scale=6,
                                     autofocus=True, lines=1, max_lines=6)
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=80)
                    stop = gr.Button("Stop", elem_id="stop", scale=1, min_width=80)
                with gr.Accordion("System prompt and sampling", open=True):
                    system = gr.Textbox(label="System prompt", value="You are a helpful assistant.", lines=2)
                    with gr.Row():
                        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 = greedy",
                                                elem_id="temperature")
                        top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p", elem_id="top-p")
                    with gr.Row():
                        max_new = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens", elem_id="max-new")
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="seed")
                    adapter = gr.Dropdown([BASE_MODEL], value=BASE_MODEL, label="LoRA adapter", elem_id="adapter",
                                          info="the adapters the engine serves; each reply runs the one chosen")
                    schema = gr.Textbox(label="JSON schema (optional): every reply is JSON that follows it",
                                        placeholder='{"type": "object", "properties": {"answer": {"type": "string"}}}',
                                        lines=2, elem_id="schema")
                clear = gr.Button("Clear chat", size="sm")
            with gr.Column(scale=2):
                engine = gr.HTML(render_panel(None, None), elem_id="engine")
        inputs = [chatbot, system, temperature, top_p, max_new, seed, schema, adapter]
        runs = [trigger(user_turn, [msg, chatbot], [msg, chatbot], queue=False).then(bot_turn, inputs, chatbot)
                for trigger in (msg.submit, send.click)]
        stop.click(None, cancels=runs)
        clear.click(lambda: [], None, chatbot, cancels=runs, queue=False)
        demo.load(adapter_choices, None, adapter, queue=False)
        gr.Timer(0.5).tick(refresh, None, engine, show_progress="hidden", concurrency_limit=None)
    return demo


def queued(demo: Any) -> Any:
    """``demo`` with Gradio's queue, polling gently while idle.

    Gradio's queue loop checks for work every 1 ms (and for progress every 10 ms) on Linux, even with
    no browser open: about 4% of a core for a server doing nothing. Gradio's own Windows values
    (50 ms, 100 ms) cut that to noise; a UI event waits at most 50 ms more to start.
    """
    demo = demo.queue(default_concurrency_limit=64)
    q = getattr(demo, "_queue", None)
    if q is not None and hasattr(q, "sleep_when_free"):
        q.sleep_when_free = max(q.sleep_when_free, IDLE_POLL_S)
        q.progress_update_sleep_when_free = max(getattr(q, "progress_update_sleep_when_free", 0), 2 * IDLE_POLL_S)
    return demo


def mount(app: Any, client: Any, *, path: str = "/ui", auth: Any = None) -> Any:
    """Mount the UI on a FastAPI app (what ``hf-paged serve`` does)."""
    demo = queued(build_ui(client))
    return gr.mount_gradio_app(app, demo, path=path, auth=auth, theme=THEME, css=CSS, ssr_mode=False,
                               footer_links=[])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="hf_paged Gradio demo against a TGI-compatible server")
    ap.add_argument("--endpoint", default="http://127.0.0.1:8080")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    args = ap.parse_args(argv)
    demo = queued(build_ui(HTTPEngineClient(args.endpoint, args.api_key)))
    demo.launch(server_name=args.host, server_port=args.port, theme=THEME, css=CSS, ssr_mode=False,
                footer_links=[])


if __name__ == "__main__":
    main()
