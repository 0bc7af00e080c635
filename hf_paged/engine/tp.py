"""Tensor parallelism: rank 0 schedules, every rank runs the same forwards.

A model loaded with ``from_pretrained(path, tp_plan="auto")`` under ``torchrun`` (or any launcher that
sets RANK/WORLD_SIZE) holds 1/N of each layer on each rank, and transformers' own hooks do the
collectives inside the forward. The engine is unchanged: rank 0 (the leader) runs the scheduler,
the sampler and delivery, and before each forward broadcasts the step's :class:`StepPlan` on a
gloo group of its own; the other ranks (followers) execute every plan they receive on their own KV
pool (1/N of the heads, the same block ids: the plan carries the slots and block tables), so the
collectives inside the forwards line up. Messages: ``("step", plan)``, ``("results", outputs)`` for
``generate()`` on every rank, ``("error", text)``, ``("stop", None)`` and ``("ping", None)`` (rank 0's
heartbeat while idle, in a server: a follower's receive gives up after ``tp_timeout_s``). A step that fails on any rank
once the plan was sent leaves the group out of step: it ends the engine (:class:`TensorParallelError`).

Example (every rank runs the same script)::

    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    pipe = hf_paged.PagedPipeline(model, tok)
    outs = pipe.generate(prompts, max_new_tokens=64)   # the same outputs on every rank
"""
from __future__ import annotations

import datetime
import queue
import threading
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0


def init_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the torch.distributed group of this launch (RANK/WORLD_SIZE from torchrun or
    ``--tensor-parallel-size``) before transformers would, so that the collectives inside the forwards
    also give up after ``timeout_s`` instead of torch's default 30 minutes. NCCL with one GPU per rank
    where CUDA is available, gloo otherwise; nothing to do when already joined or alone (WORLD_SIZE=1). A
    process that no launcher started (no WORLD_SIZE) is refused: the model would run unsharded."""
    import os

    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        raise ValueError("tp_plan: this process is not one of a launch of ranks (torchrun, or hf-paged serve "
                         "--tensor-parallel-size N): the model would run unsharded on one device")
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed or went away; the group cannot go on."""


class StepChannel:
    """Rank 0 -> all ranks, in order, on a separate gloo group (never interleaved with the forwards'
    collectives on the default group). A collective that waits longer than ``timeout_s`` for a rank
    raises :class:`TensorParallelError` instead of hanging."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not dist.is_initialized():
            raise ValueError("tensor parallelism needs torch.distributed initialized (torchrun, or "
                             "from_pretrained(..., tp_plan='auto') under RANK/WORLD_SIZE)")
        self.timeout_s = timeout_s
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self._lock = threading.Lock()  # the engine thread and a generate() caller both send on rank 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, kind: str, payload: Any = None) -> None:
        with self._lock:
            self._broadcast([(kind, payload)])

    def send_step(self, plan: Any) -> None:
        self.send("step", plan)

    def get_with_heartbeat(self, inbox: Any) -> Any:
        """``inbox.get()``, sending ``("ping", None)`` every ``timeout_s / 4`` while it waits (rank 0, idle, with
        followers in ``follow()``): their receive gives up after ``timeout_s``; a dead rank fails the ping."""
        while True:
            try:
                return inbox.get(timeout=self.timeout_s / 4)
            except queue.Empty:
                self.send("ping")

    def recv(self) -> tuple[str, Any]:
        box: list[Any] = [None]
        self._broadcast(box)
        return box[0]

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (every rank calls it)."""
        t = torch.tensor([int(value)], dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError subclasses of its own
            raise TensorParallelError(f"tensor-parallel ranks could not agree: {exc}") from exc
        return int(t.item())

    def _broadcast(self, box: list[Any]) -> None:
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except Exception as exc:  # noqa: BLE001
            raise TensorParallelError(
                f"tensor-parallel rank {self.rank} of {self.world} lost its group (a rank died or timed out): "
                f"{type(exc).__name__}: {exc}") from exc
