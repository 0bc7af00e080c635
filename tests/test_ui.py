"""The Gradio UI: mounted at /ui and driven by headless Chromium; its HTTP client and panel rendering.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``) and the ``selenium`` package; it is skipped, with the reason, without them.
It saves a screenshot of the page (to ``docs/ui.png`` when HF_PAGED_UPDATE_SCREENSHOT=1 is set, so an
ordinary test run leaves the checkout clean; to a temporary file otherwise).
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import tempfile
import threading
import time

import pytest

pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

import hf_paged  # noqa: E402
from hf_paged.engine.pipeline import PagedPipeline  # noqa: E402
from hf_paged.server import create_app  # noqa: E402
from test_server import MODEL_ID, Served, wait_idle  # noqa: E402

SCREENSHOT = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "ui.png"
              if os.environ.get("HF_PAGED_UPDATE_SCREENSHOT") == "1"
              else pathlib.Path(tempfile.gettempdir()) / "hf_paged_ui.png")
OTHER_USERS = ["Write a short poem about autumn leaves.", "Explain what a hash table is.",
               "List five animals that live in the ocean.", "Describe the taste of a lemon."]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def pipe():
    model, tok = hf_paged.load_default_model()
    p = PagedPipeline(model, tok, kv_memory="256MiB", max_num_seqs=32)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(pipe):
    srv = Served(create_app(pipe, model_id=MODEL_ID, ui=True, close_pipeline=False))
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _idle_after(request):
    yield
    if "pipe" in request.fixturenames:
        wait_idle(request.getfixturevalue("pipe"), timeout=60)


@pytest.fixture(scope="module")
def demo():
    from hf_paged import ui

    return ui


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("headless Chromium not installed: apt-get install -y chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='hf_paged_chromium_')}", "--window-size=1400,1250"]:
        opts.add_argument(flag)
    opts.binary_location = CHROMIUM
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_ui_chat_updates_block_view(server, pipe):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.common.exceptions import StaleElementReferenceException

    driver = _browser()
    try:
        driver.get(f"{server.url}/ui/")
        grid = lambda: driver.find_elements(By.CSS_SELECTOR, "#kv-grid")  # noqa: E731
        keys = ("used", "cached", "free")

        def counts() -> dict[str, int]:
            # Gradio re-renders the grid every refresh: an element read mid-swap is stale or empty.
            for _ in range(100):
                try:
                    found = grid()
                    vals = [found[0].get_attribute(f"data-{k}") for k in keys] if found else [None]
                except StaleElementReferenceException:
                    vals = [None]
                if None not in vals:
                    return {k: int(v) for k, v in zip(keys, vals)}
                time.sleep(0.05)
            raise AssertionError("the block pool view could not be read")

        _wait(grid, 60, "the block pool view")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        before = counts()
        assert before["used"] == 0 and sum(before.values()) == pipe.stats()["blocks_total"]
        # Fewer new tokens than the default keeps the test short on a CPU.
        box = driver.find_element(By.CSS_SELECTOR, "#max-new input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("48", Keys.TAB)
        driver.find_element(By.CSS_SELECTOR, "#msg textarea").send_keys("Name three colours of the rainbow.")
        driver.find_element(By.CSS_SELECTOR, "#send").click()
        driver.execute_script("window.scrollTo(0, 0)")
        # Other users at the same time, so the picture shows a shared pool (and the screenshot has colour).
        others = [threading.Thread(target=httpx.post, args=(f"{server.url}/v1/chat/completions",),
                                   kwargs={"json": {"messages": [{"role": "user", "content": q}], "max_tokens": 40},
                                           "timeout": 120}) for q in OTHER_USERS]
        for t in others:
            t.start()
        seen_used, shot, busy_since = 0, False, None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            used = counts()["used"]
            if used >= 4 and busy_since is None:
                busy_since = time.monotonic()
            if not shot and used and busy_since is not None and time.monotonic() - busy_since > 2.5:
                driver.save_screenshot(str(SCREENSHOT))  # mid-generation: used blocks on screen
                shot = True
            seen_used = max(seen_used, used)
            s = pipe.stats()
            if s["tokens_generated"] > 0 and s["running"] == 0 and s["waiting"] == 0:
                break
            time.sleep(0.1)
        for t in others:
            t.join(timeout=60)
        chat = driver.find_element(By.CSS_SELECTOR, "#chat").text
        reply = _wait(lambda: driver.find_element(By.CSS_SELECTOR, "#chat").text.split(
            "Name three colours of the rainbow.", 1)[-1].strip(), 30, f"a streamed reply (chat: {chat!r})")
        assert reply
        after = _wait(lambda: (c := counts()) != before and c["used"] == 0 and c, 10, "the block view to change")
        assert seen_used > 0 or after["cached"] > before["cached"], (before, after, seen_used)
        if not shot:
            driver.save_screenshot(str(SCREENSHOT))
    finally:
        driver.quit()


def test_ui_json_schema_mode(server, pipe):
    """The chat's JSON-schema mode: the reply is JSON that follows the schema typed into the UI."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}
    question = "Pick a colour."
    driver = _browser()
    try:
        driver.get(f"{server.url}/ui/")
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#schema textarea"), 60, "the schema box")
        driver.find_element(By.CSS_SELECTOR, "#schema textarea").send_keys(json.dumps(schema))
        box = driver.find_element(By.CSS_SELECTOR, "#max-new input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("32", Keys.TAB)
        driver.find_element(By.CSS_SELECTOR, "#msg textarea").send_keys(question)
        driver.find_element(By.CSS_SELECTOR, "#send").click()

        def reply():
            text = driver.find_element(By.CSS_SELECTOR, "#chat").text.split(question, 1)[-1].strip()
            try:
                return json.loads(text)
            except ValueError:
                return None

        assert _wait(reply, 60, "a JSON reply")["color"] in ("red", "green", "blue")
    finally:
        driver.quit()


def test_http_client_against_server(server, demo):
    client = demo.HTTPEngineClient(server.url)

    async def run():
        text = [d async for d in client.chat([{"role": "user", "content": "Hi"}], temperature=0, top_p=1.0,
                                             max_new_tokens=6, seed=None)]
        return "".join(text), await client.stats(), await client.blocks()

    text, stats, blocks = asyncio.run(run())
    assert text and stats["engine"] == "hf_paged" and len(blocks["states"]) == stats["blocks_total"]
    html = demo.render_panel(stats, blocks, [1.0, 2.0, 3.0])
    assert 'id="kv-grid"' in html and f'data-total="{stats["blocks_total"]}"' in html and "<polyline" in html


def test_http_client_degrades_on_other_servers(demo):
    tgi_metrics = "# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 3\ntgi_queue_size 1\n"

    def tgi_like(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=tgi_metrics)
        return httpx.Response(404, json={"error": "Not Found", "error_type": "not_found"})

    async def views(handler):
        client = demo.HTTPEngineClient("http://tgi.invalid")
        client.http = httpx.AsyncClient(base_url="http://tgi.invalid", transport=httpx.MockTransport(handler))
        return await client.stats(), await client.blocks()

    stats, blocks = asyncio.run(views(tgi_like))
    assert stats == {"running": 3, "waiting": 1, "engine": "tgi"} and blocks is None
    assert "No KV block view" in demo.render_panel(stats, blocks)
    stats, blocks = asyncio.run(views(lambda r: httpx.Response(404)))
    assert stats is None and "unavailable" in demo.render_panel(stats, blocks)


def test_block_grid_groups_large_pools(demo):
    states = [1] * 1000 + [2] * 500 + [0] * 3500
    svg = demo.block_grid_svg(states)
    assert 'data-used="1000"' in svg and 'data-cached="500"' in svg and 'data-free="3500"' in svg
    assert 'data-group="5"' in svg and svg.count("<title>") == 1000


def test_ui_chats_with_a_chosen_lora_adapter(server, pipe, demo, tmp_path):
    """The adapter dropdown lists what the engine serves; both clients run the adapter chosen."""
    peft = pytest.importorskip("peft")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    base = type(pipe.model)(pipe.model.config)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    lora.save_pretrained(tmp_path / "ui-lora")
    pipe.load_adapter("ui-lora", str(tmp_path / "ui-lora"))
    try:
        messages = [{"role": "user", "content": "Name a colour."}]
        want = {a: pipe.generate(messages, adapter=a, max_new_tokens=8, do_sample=False).text
                for a in (None, "ui-lora")}
        assert want[None] != want["ui-lora"]

        async def run(client):  # one event loop per client: its HTTP connections belong to it
            texts = {}
            for a in (None, "ui-lora"):
                deltas = client.chat(messages, temperature=0, top_p=1.0, max_new_tokens=8, seed=None, adapter=a)
                texts[a] = "".join([d async for d in deltas])
            return await client.adapters(), texts

        from hf_paged.server.engine_view import LocalEngineClient

        for client in (demo.HTTPEngineClient(server.url), LocalEngineClient(pipe, MODEL_ID)):
            assert asyncio.run(run(client)) == (["ui-lora"], want)

        driver = _browser()
        try:
            driver.get(f"{server.url}/ui/")
            box = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#adapter input"), 60, "the adapter box")[0]
            box.click()
            option = _wait(lambda: [o for o in driver.find_elements(By.CSS_SELECTOR, "#adapter li[role=option]")
                                    if o.get_attribute("aria-label") == "ui-lora"], 30, "the adapter option")[0]
            option.click()
            temp = driver.find_element(By.CSS_SELECTOR, "#temperature input[type=number]")
            temp.send_keys(Keys.CONTROL, "a")
            temp.send_keys("0", Keys.TAB)
            driver.find_element(By.CSS_SELECTOR, "#msg textarea").send_keys("Name a colour.")
            driver.find_element(By.CSS_SELECTOR, "#send").click()
            with_system = [{"role": "system", "content": "You are a helpful assistant."}, *messages]
            expected = pipe.generate(with_system, adapter="ui-lora", max_new_tokens=12, do_sample=False).text
            assert pipe.generate(with_system, max_new_tokens=12, do_sample=False).text[:12] != expected[:12]
            _wait(lambda: expected[:12].strip() in driver.find_element(By.CSS_SELECTOR, "#chat").text, 90,
                  "the adapter's reply")
        finally:
            driver.quit()
    finally:
        wait_idle(pipe, timeout=60)
        pipe.unload_adapter("ui-lora")


def test_ui_chats_are_admitted_like_api_requests(pipe, monkeypatch):
    """The UI on the server talks to the engine in-process, and is admitted as an API request is: a concurrency
    slot (none free: the chat is refused), the prompt within max_input_tokens, its schema compiled on the
    grammar worker (its queue and time limit). A refusal is an error the chat shows; the slot comes back."""
    app = create_app(pipe, model_id=MODEL_ID, ui=False, close_pipeline=False, max_concurrent_requests=1,
                     max_input_tokens=64)
    state = app.state.hf_paged
    from hf_paged.server.engine_view import LocalEngineClient

    client = LocalEngineClient(pipe, MODEL_ID, state)
    kw = dict(temperature=0.0, top_p=1.0, max_new_tokens=4, seed=None)
    hello = [{"role": "user", "content": "Hello"}]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}

    async def chat(messages, **extra):
        return "".join([t async for t in client.chat(messages, **kw, **extra)])

    async def run():
        assert await chat(hello)
        assert state.in_flight == 0
        compiled = []
        real = type(state).compile_grammar

        async def counted(self, constraint):
            compiled.append(constraint[0])
            await real(self, constraint)

        monkeypatch.setattr(type(state), "compile_grammar", counted)
        assert (await chat(hello, json_schema=schema)).startswith("{")  # cut at 4 tokens
        assert compiled == ["json_schema"] and state.in_flight == 0
        with pytest.raises(RuntimeError, match="max_input_tokens"):
            await chat([{"role": "user", "content": "word " * 200}])
        permit = state.acquire(1)  # the one slot is taken
        try:
            with pytest.raises(RuntimeError, match="overloaded"):
                await chat(hello)
        finally:
            permit.release()
        assert state.in_flight == 0 and await chat(hello)

    asyncio.run(run())


def test_a_failed_reply_is_not_fed_back_to_the_model():
    """The chat shows a reply's error; the next turn sends the model the conversation without it."""
    from hf_paged.ui import ERROR_MARK, model_turns

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ERROR_MARK + "HTTP 429: overloaded"},
            {"role": "user", "content": "Tell me"},
            {"role": "assistant", "content": [{"type": "text", "text": "Once" + ERROR_MARK + "cancelled"}]},
            {"role": "user", "content": "Go on"}]
    assert model_turns(chat) == [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "Once"},
                                 {"role": "user", "content": "Go on"}]


def test_ui_replies_are_capped_by_the_kv_pool_too(monkeypatch):
    """A pool smaller than the context: the slider's value is cut to what one sequence can hold (it failed)."""
    from hf_paged.server.engine_view import LocalEngineClient

    with hf_paged.PagedPipeline.from_pretrained("default", num_blocks=12, block_size=16) as small:
        client = LocalEngineClient(small, MODEL_ID, None)

        async def run():
            return "".join([t async for t in client.chat([{"role": "user", "content": "Hello"}], temperature=0.0,
                                                         top_p=1.0, max_new_tokens=512, seed=None)])

        assert asyncio.run(run())
