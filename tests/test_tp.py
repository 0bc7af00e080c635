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
