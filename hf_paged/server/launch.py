"""``hf-paged serve --tensor-parallel-size N`` without torchrun: start the N local ranks here.

Each rank is a process (``torch.multiprocessing``, spawn) with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR/PORT); transformers' ``tp_plan="auto"`` joins them (gloo on CPU, NCCL on GPUs, one GPU per
rank). Rank 0 serves HTTP. If any rank exits with an error, torch's process context stops the others
and this launcher exits with that error: a dead rank stops the group, it never leaves it half alive.
"""
from __future__ import annotations

import argparse
import inspect
import os
import signal
import socket


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    # A process group of its own: a terminal's Ctrl-C reaches the launcher alone, which passes it to rank 0
    # once (a second SIGINT would make uvicorn skip the drain).
    os.setpgrp()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if os.environ.get("HF_PAGED_RANK_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["HF_PAGED_RANK_THREADS"]))
    from .__main__ import serve

    serve(args)


def launch_ranks(args: argparse.Namespace) -> int:
    """Run ``args.tensor_parallel_size`` ranks of ``serve(args)``; returns the exit code."""
    import torch.multiprocessing as mp

    world = args.tensor_parallel_size
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank_main, args=(world, port, args), nprocs=world, join=False, start_method="spawn")
    print("hf_paged: tensor-parallel ranks started: " + ", ".join(f"rank {r} pid {p.pid}"
                                                              for r, p in enumerate(ctx.processes)), flush=True)

    def forward(signum, _frame) -> None:
        # SIGTERM / Ctrl-C: rank 0 drains and shuts the server down, then closes its pipeline, which stops the
        # others (they ignore both signals).
        leader = ctx.processes[0]
        if leader.is_alive() and leader.pid:
            os.kill(leader.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        # A rank that failed: the others have a few seconds to end on their own (rank 0 stops its server when
        # the group breaks), then SIGTERM, which followers ignore, then SIGKILL.
        grace = {"grace_period": 5.0} if "grace_period" in inspect.signature(ctx.join).parameters else {}
        while not ctx.join(timeout=1.0, **grace):  # torch 2.4 has no grace period: SIGTERM at once
            pass
    except mp.ProcessExitedException as exc:
        print(f"hf_paged: tensor-parallel rank {exc.error_index} exited ({exc}); the other ranks were stopped",
              flush=True)
        return 1
    except mp.ProcessRaisedException as exc:
        print(f"hf_paged: a tensor-parallel rank failed:\n{exc}", flush=True)
        return 1
    return 0
