"""``hf-paged serve`` / ``python -m hf_paged.server``: run the server with uvicorn.

    hf-paged serve --model default --port 8080 --kv-memory 1GiB --max-num-seqs 64
    python -m hf_paged.server --model /path/to/model --api-key secret
    torchrun --nproc-per-node 2 -m hf_paged serve --tp-plan auto --model /path/to/model
    hf-paged serve --tensor-parallel-size 2 --model /path/to/model   # starts the 2 ranks itself

Binds 127.0.0.1 unless told otherwise: the API can generate, so exposing it is a decision.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import threading

from ..config import add_cli_arguments as add_engine_arguments
from ..config import from_cli
from ..models import DEVICE_HELP, DTYPE_CHOICES, DTYPE_HELP, cli_device, cli_dtype


def add_arguments(parser: argparse.ArgumentParser, *, common: bool = True) -> None:
    """Serve options. ``common=False`` leaves ``--model`` and the engine options to a parent parser but
    still accepts them after ``serve`` (``SUPPRESS`` keeps the parent's defaults)."""
    parser.add_argument("--model", default="default" if common else argparse.SUPPRESS,
                        help='local model folder or "default"')
    parser.add_argument("--dtype", default="auto" if common else argparse.SUPPRESS, choices=DTYPE_CHOICES,
                        help=DTYPE_HELP)
    parser.add_argument("--device", default="auto" if common else argparse.SUPPRESS, help=DEVICE_HELP)
    add_engine_arguments(parser, suppress_defaults=not common)
    parser.add_argument("--model-id", default=None, help="name reported by /info and /v1/models")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-concurrent-requests", type=int, default=128,
                        help="sequences of HTTP generation requests in flight before answering 429 (TGI's "
                             "default; a request with n=4 counts 4)")
    parser.add_argument("--max-n", type=int, default=16, help="largest OpenAI `n` (sequences per request)")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                        help="largest request body; larger ones get 413")
    parser.add_argument("--validation-workers", type=int, default=2,
                        help="threads that tokenize and apply chat templates (TGI's option)")
    parser.add_argument("--max-input-tokens", type=int, default=None)
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on generation routes")
    parser.add_argument("--no-ui", action="store_true", help="do not mount the Gradio UI at /ui")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--timeout-keep-alive", type=float, default=5.0,
                        help="seconds an idle keep-alive connection stays open (uvicorn's default); behind a load "
                             "balancer, set it above the balancer's idle timeout, or reused connections fail")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="on shutdown (SIGTERM, Ctrl-C), seconds that running requests have to finish; new "
                             "ones get 503 meanwhile, and those still running then end with a 503 error")
    parser.add_argument("--tp-plan", choices=["auto"], default=None,
                        help="tensor parallel over the torch.distributed ranks (under torchrun): rank 0 serves "
                             "HTTP and schedules, the other ranks follow its steps")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="start this many local ranks (gloo on CPU, NCCL on GPUs) and serve tensor parallel")


def serve(args: argparse.Namespace) -> None:

    from ..engine.pipeline import PagedPipeline
    from ..engine.tp import TensorParallelError
    from ..models import DEFAULT_MODEL_NAME
    from .app import create_app
    from .serving import DrainingServer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tensor_parallel_size > 1 and world == 1:
        from .launch import launch_ranks

        raise SystemExit(launch_ranks(args))
    if world > 1 and args.tp_plan is None and args.tensor_parallel_size == 1:
        raise SystemExit("hf_paged: started as one of several ranks: add --tp-plan auto to serve tensor parallel")
    tp_plan = "auto" if world > 1 else None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Tensor parallel: transformers puts rank r on GPU r (LOCAL_RANK); otherwise --device.
    pipe = PagedPipeline.from_pretrained(args.model, dtype=cli_dtype(args.dtype), config=from_cli(args),
                                         tp_plan=tp_plan, device=None if tp_plan else cli_device(args.device))
    if pipe.follower:  # runs rank 0's steps until rank 0 shuts down
        # Rank 0 drains its requests on SIGTERM or Ctrl-C, and they need this rank until it closes its
        # pipeline, which ends follow() here (torchrun sends SIGTERM to every rank, a terminal's Ctrl-C reaches
        # them all). Should rank 0 die instead, the group's timeout (--tp-timeout-s) ends this rank.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            with frozen_heap():
                pipe.follow()
        except TensorParallelError as exc:
            raise SystemExit(f"hf_paged rank {pipe.tp.rank}: {exc}") from None
        return
    model_id = args.model_id or (DEFAULT_MODEL_NAME if args.model == "default" else args.model)
    app = create_app(pipe, model_id=model_id, max_concurrent_requests=args.max_concurrent_requests,
                     api_key=args.api_key, max_input_tokens=args.max_input_tokens, ui=not args.no_ui,
                     max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                     validation_workers=args.validation_workers)
    print(f"hf_paged serving {model_id} on http://{args.host}:{args.port}"
          + ("" if args.no_ui else f"  (UI: http://{args.host}:{args.port}/ui)"), flush=True)
    server = DrainingServer(app, drain=args.shutdown_timeout, host=args.host, port=args.port,
                            log_level=args.log_level, timeout_keep_alive=args.timeout_keep_alive)
    if pipe.tp is not None:
        pipe.lead()  # the engine's heartbeat keeps the followers waiting for requests
        threading.Thread(target=_stop_when_broken, args=(pipe, server), daemon=True).start()
    try:
        with frozen_heap():
            server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully and re-raised it (uvicorn.run hides it too)
        pass
    if pipe._broken is not None:
        raise SystemExit(f"hf_paged: the tensor-parallel group broke: {pipe._broken}")


@contextlib.contextmanager
def frozen_heap():
    """Everything loaded before serving (model, tokenizer, libraries, the app: ~400K objects that the cyclic
    garbage collector tracks) lives as long as the server, so it is moved out of the collector's view
    (``gc.freeze``): a full collection then scans only what requests create. Unfrozen, full collections
    stalled every stream for 100-250 ms on this project's CPU (docs/benchmarks.md), as in vLLM, which
    freezes its heap after start-up too. Unfrozen again on the way out, so the exit frees it normally."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _stop_when_broken(pipe, server) -> None:
    """Rank 0 of a tensor-parallel server: a dead rank stops the whole server (never a half-alive one)."""
    while not server.should_exit:
        if pipe._broken is not None:
            logging.getLogger(__name__).error("hf_paged: stopping the server: %s", pipe._broken)
            server.should_exit = True
            return
        threading.Event().wait(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_paged.server", description=__doc__.splitlines()[0])
    add_arguments(parser)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
