"""Rank bodies of the tensor-parallel tests (tests/test_tp.py): each runs in its own process, joins a
gloo group of 2 through the RANK/WORLD_SIZE environment, and writes what it saw to ``out/<rank>.json``."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import transformers as tf

PROMPTS = [[1, 5, 9, 12, 7], [1, 44, 3, 90, 17, 23, 51, 8, 61, 11, 4, 77, 30, 5, 6, 7, 8, 9, 10, 11], [1, 200, 13]]
GREEDY = dict(max_new_tokens=12, do_sample=False, ignore_eos=True, progress=False)


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def parity(rank: int, world: int, port: int, model_path: str, out: str) -> None:
    """wrap + generate(), PagedPipeline.generate() and streaming under TP against the unsharded model."""
    import hf_paged
    from tiny_models import IdTokenizer

    _join(rank, world, port)
    seen: dict = {}
    ids = torch.tensor([[1, 5, 9, 12, 7], [0, 1, 3, 3, 8]])
    mask = torch.tensor([[1] * 5, [0, 1, 1, 1, 1]])
    plain = tf.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    want = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    with hf_paged.PagedPipeline(plain, IdTokenizer(), num_blocks=64) as ref:
        want_pipe = [o.token_ids for o in ref.generate(PROMPTS, **GREEDY)]
        single_pool = ref.pool.nbytes

    sharded = tf.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, tp_plan="auto").eval()
    hf_paged.wrap(sharded, num_blocks=64)
    seen["wrap_equal"] = torch.equal(sharded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                                                      do_sample=False), want)
    seen["pool_ratio"] = hf_paged.kv_pool(sharded).nbytes / single_pool
    pipe = hf_paged.PagedPipeline(sharded, IdTokenizer(), num_blocks=64, max_batch_tokens=16)
    seen["pipe_equal"] = [o.token_ids for o in pipe.generate(PROMPTS, **GREEDY)] == want_pipe
    seen["follower"] = pipe.follower
    if pipe.follower:
        pipe.follow()  # until rank 0 closes
        seen["followed"] = True
    else:
        events = list(pipe.stream(PROMPTS[1], max_new_tokens=12, do_sample=False, ignore_eos=True))
        seen["stream_equal"] = events[-1].output.outputs[0].token_ids == want_pipe[1]
        seen["blocks_used"] = pipe.stats()["blocks_used"]
        pipe.close()
    Path(out, f"{rank}.json").write_text(json.dumps(seen))


def dead_follower(rank: int, world: int, port: int, model_path: str, out: str) -> None:
    """Rank 1 dies after the pipeline is built; rank 0's generate() must fail clearly, not hang."""
    import hf_paged
    from tiny_models import IdTokenizer

    _join(rank, world, port)
    model = tf.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, tp_plan="auto").eval()
    pipe = hf_paged.PagedPipeline(model, IdTokenizer(), num_blocks=64, tp_timeout_s=20)
    if rank == 1:
        os._exit(3)
    time.sleep(1.0)
    started = time.monotonic()
    seen: dict = {}
    try:
        pipe.generate(PROMPTS, **GREEDY)
        seen["error"] = None
    except Exception as exc:  # noqa: BLE001 - what it raised is the finding
        seen["error"] = f"{type(exc).__name__}: {exc}"
    seen["seconds"] = time.monotonic() - started
    seen["alive"] = pipe.alive
    Path(out, f"{rank}.json").write_text(json.dumps(seen))
    os._exit(0)  # the group is broken: skip the collective teardown


def idle_leader(rank: int, world: int, port: int, model_path: str, out: str) -> None:
    """A server's ranks: rank 0 leads (a heartbeat while idle), rank 1 follows. Idle for longer than
    tp_timeout_s, a request is still served; adapters cannot be loaded; then a step that fails on rank 0 after
    its plan went out ends the engine at once with a clear error (the group is out of step), not a hang."""
    import hf_paged
    from tiny_models import IdTokenizer

    _join(rank, world, port)
    model = tf.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, tp_plan="auto").eval()
    seen: dict = {}
    # The default KV budget is a share of each rank's free memory: the ranks' pools must still agree.
    import importlib

    wrap_module = importlib.import_module("hf_paged.wrap")  # the module (hf_paged.wrap is also the function)

    budget = wrap_module.default_kv_memory
    wrap_module.default_kv_memory = lambda device: (3 + 2 * rank) * 2**20
    hf_paged.wrap(model)
    pool = hf_paged.kv_pool(model)
    seen["default_blocks"], seen["block_bytes"] = pool.num_blocks, pool.nbytes // pool.num_blocks
    hf_paged.unwrap(model)
    wrap_module.default_kv_memory = budget
    pipe = hf_paged.PagedPipeline(model, IdTokenizer(), num_blocks=64, tp_timeout_s=3)
    if pipe.follower:
        try:
            pipe.follow()
            seen["follow"] = "stopped"
        except Exception as exc:  # noqa: BLE001 - what it raised is the finding
            seen["follow"] = f"{type(exc).__name__}: {exc}"
        Path(out, f"{rank}.json").write_text(json.dumps(seen))
        os._exit(0)
    pipe.lead()
    time.sleep(8)  # idle: more than twice tp_timeout_s
    seen["tokens"] = pipe.submit(PROMPTS[0], max_new_tokens=12, do_sample=False, ignore_eos=True).result(
        timeout=60).outputs[0].token_ids
    try:
        pipe.load_adapter("a", "/no/such/adapter")
    except ValueError as exc:
        seen["load_adapter"] = str(exc)

    def broken(plan, prev_ids=None):
        raise RuntimeError("injected after the plan went out")

    pipe.engine.runner.execute = broken
    started = time.monotonic()
    try:
        pipe.submit(PROMPTS[1], max_new_tokens=4, do_sample=False).result(timeout=60)
        seen["error"] = None
    except Exception as exc:  # noqa: BLE001
        seen["error"] = f"{type(exc).__name__}: {exc}"
    seen["seconds"] = time.monotonic() - started
    seen["alive"] = pipe.alive
    Path(out, f"{rank}.json").write_text(json.dumps(seen))
    time.sleep(1)  # the follower writes what it saw once this process is gone
    os._exit(0)
