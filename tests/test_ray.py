"""Replicas under Ray Serve: a local Ray instance, 2 CPU replicas of a tiny model, concurrent OpenAI
requests through Ray's HTTP proxy; both replicas answer, with the single-process answer. Skipped where
Ray cannot be installed."""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def test_two_replicas_behind_rays_proxy(tmp_path):
    import hf_paged
    from hf_paged import serve_ray
    from served import save_tiny_chat_model

    save_tiny_chat_model(tmp_path)
    messages = [{"role": "user", "content": "Say something."}]
    with hf_paged.PagedPipeline.from_pretrained(str(tmp_path), num_blocks=64) as ref:
        want = ref.generate(messages, max_new_tokens=8, do_sample=False).text
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve_ray.serve_ray(str(tmp_path), num_replicas=2, engine={"num_blocks": 64, "max_num_seqs": 8},
                            ray_actor_options={"num_cpus": 0.5})
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def ask(_):
            r = httpx.post(url, json={"messages": messages, "max_tokens": 8, "temperature": 0}, timeout=120)
            if r.status_code != 200:
                return r.status_code, r.text, None
            return r.status_code, r.json()["choices"][0]["message"]["content"], r.headers.get("x-hf-paged-replica")

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(24)))
        assert all(code == 200 and text == want for code, text, _ in answers), answers
        assert len({replica for *_, replica in answers}) == 2, answers
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_replica_whose_engine_stopped_fails_its_health_check(monkeypatch):
    """Ray Serve calls each replica's check_health; a replica whose engine stopped (its thread died, its
    tensor-parallel group broke) answers 503 for ever, so the check fails and Ray replaces it."""
    from types import SimpleNamespace

    from hf_paged import serve_ray

    pipe = SimpleNamespace(alive=True, _broken=None)
    monkeypatch.setitem(serve_ray._REPLICA, "app", SimpleNamespace(state=SimpleNamespace(
        hf_paged=SimpleNamespace(pipe=pipe))))
    serve_ray.check_replica()
    pipe.alive, pipe._broken = False, "tensor-parallel rank 1 of 2 lost its group"
    with pytest.raises(RuntimeError, match="engine has stopped: tensor-parallel rank 1"):
        serve_ray.check_replica()
