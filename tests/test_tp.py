"""Tensor parallelism on CPU: 2 gloo ranks (one process each) on tiny Llama and Qwen2 models sharded by
transformers (``tp_plan="auto"``): wrap + generate() and PagedPipeline equal the unsharded model on
every rank, streaming from rank 0, each rank's KV pool holds half the heads, and a dead rank is a
clear error instead of a hang. The rank bodies are in tests/tp_worker.py."""
from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp
import tp_worker
from tiny_models import build


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(fn, model_path, tmp_path, world: int = 2, timeout: float = 240) -> list[dict]:
    ctx = mp.start_processes(fn, args=(world, _port(), str(model_path), str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    return [json.loads((tmp_path / f"{r}.json").read_text()) if (tmp_path / f"{r}.json").exists() else None
            for r in range(world)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_ranks_equal_the_unsharded_model(arch, tiny_root, tmp_path):
    seen = _run(tp_worker.parity, build(arch, tiny_root), tmp_path)
    for rank, s in enumerate(seen):
        assert s is not None, f"rank {rank} wrote nothing"
        assert s["wrap_equal"] and s["pipe_equal"], (rank, s)
        assert s["pool_ratio"] == pytest.approx(0.5), s  # each rank keeps its half of the KV heads
    assert seen[0]["stream_equal"] and seen[0]["blocks_used"] == 0 and not seen[0]["follower"]
    assert seen[1]["follower"] and seen[1]["followed"]


def test_a_dead_rank_is_a_clear_error_not_a_hang(tiny_root, tmp_path):
    seen = _run(tp_worker.dead_follower, build("llama", tiny_root), tmp_path)
    s = seen[0]
    assert s is not None and s["error"] is not None, s
    assert "tensor-parallel" in s["error"] and "lost its group" in s["error"], s["error"]
    assert s["seconds"] < 60 and not s["alive"]


def test_an_idle_leader_keeps_its_followers_and_a_failed_step_ends_the_group_at_once(tiny_root, tmp_path):
    """Without rank 0's heartbeat an idle server's followers gave up after tp_timeout_s (and the server died);
    a step failing on rank 0 after its plan went out left the group out of step until the next request hung."""
    seen = _run(tp_worker.idle_leader, build("llama", tiny_root), tmp_path)
    s = seen[0]
    assert s is not None and len(s["tokens"]) == 12, s
    assert "not supported under tensor parallelism" in s["load_adapter"]
    assert "out of step" in s["error"] and "injected" in s["error"], s["error"]
    assert s["seconds"] < 10 and not s["alive"]
    follower = seen[1]
    assert follower is not None and "TensorParallelError" in follower["follow"], follower
    # 3 and 5 MiB budgets: both pools hold what the smaller one does
    assert s["default_blocks"] == follower["default_blocks"] == 3 * 2**20 // s["block_bytes"]


def test_tp_plan_outside_a_launch_is_refused(tiny_root, monkeypatch):
    """A process no launcher started (a Ray Serve replica, a plain script) would run the model unsharded."""
    import hf_paged
    from hf_paged import serve_ray

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="not one of a launch of ranks"):
        hf_paged.PagedPipeline.from_pretrained(str(build("llama", tiny_root)), tp_plan="auto")
    with pytest.raises(ValueError, match="tp_plan is not supported under Ray Serve"):
        serve_ray.deployment("default", engine={"tp_plan": "auto"})


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny Llama (4 heads, 2 KV heads) with the default model's tokenizer, saved as a model folder."""
    from served import save_tiny_chat_model

    path = tmp_path_factory.mktemp("tp_chat_model")
    save_tiny_chat_model(path)
    return path


def _rank_pids(log_text: str) -> dict[int, int]:
    """rank -> pid, from the launcher's "rank 0 pid 123, rank 1 pid 456" line."""
    import re

    return {int(r): int(p) for r, p in re.findall(r"rank (\d+) pid (\d+)", log_text)}


def test_server_with_two_ranks_answers_and_stops_when_a_rank_dies(chat_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    import hf_paged

    prompt, messages = "Hello there", [{"role": "user", "content": "Say something."}]
    with hf_paged.PagedPipeline.from_pretrained(str(chat_model_dir), num_blocks=64) as ref:
        want_text = ref.generate(prompt, max_new_tokens=8, do_sample=False).text
        want_chat = ref.generate(messages, max_new_tokens=8, do_sample=False).text
    port = _port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "hf_paged.server", "--model", str(chat_model_dir),
                             "--port", str(port), "--tensor-parallel-size", "2", "--num-blocks", "64", "--no-ui",
                             "--log-level", "warning", "--tp-timeout-s", "20"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_PAGED_RANK_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        r = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 8}}, timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"] == want_text, r.text
        r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want_chat, r.text
        ranks = _rank_pids((tmp_path / "server.log").read_text())
        assert set(ranks) == {0, 1}, ranks
        # A follower ignores SIGTERM and Ctrl-C (rank 0 needs it to drain its requests on shutdown).
        os.kill(ranks[1], signal.SIGTERM)
        os.kill(ranks[1], signal.SIGINT)
        time.sleep(0.5)
        r = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 8}}, timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"] == want_text, r.text
        os.kill(ranks[1], signal.SIGKILL)  # a rank dies: the whole group stops, with a message
        assert proc.wait(timeout=60) != 0
        assert "tensor-parallel rank 1 exited" in (tmp_path / "server.log").read_text()
        time.sleep(0.5)
        assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                       for pid in ranks.values()), "a rank outlived the group"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_default_model_under_three_ranks_equals_one_process(tmp_path):
    """SmolLM2 (9 heads, 3 KV heads) splits over 3 ranks only: benchmarks/tp_cpu.py --dry-run compares."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "tp_cpu.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=400, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["rounds"]
    assert r["equal_requests"] == r["requests"] == 4 and r["tokens"] > 0, r


def test_device_map_auto_on_a_machine_without_gpus(tiny_root):
    """All that is tested of device_map (docs/scaling.md): "auto" with no GPU loads onto the CPU and
    the pipeline runs it as usual. A split over several GPUs is untested."""
    import hf_paged
    from tiny_models import IdTokenizer, load

    path = build("llama", tiny_root)
    with hf_paged.PagedPipeline(load(path), IdTokenizer(), num_blocks=64) as ref:
        want = [o.token_ids for o in ref.generate(tp_worker.PROMPTS, **tp_worker.GREEDY)]
    with hf_paged.PagedPipeline(_load_mapped(path), IdTokenizer(), num_blocks=64) as pipe:
        got = [o.token_ids for o in pipe.generate(tp_worker.PROMPTS, **tp_worker.GREEDY)]
    assert got == want


def _load_mapped(path):
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="auto").eval()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    return model
