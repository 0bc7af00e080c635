"""``hf-paged serve`` / ``python -m hf_paged.server``: run the server with uvicorn.

    hf-paged serve --model default --port 8080 --kv-memory 1GiB --max-num-seqs 64
    python -m hf_paged.server --model /path/to/model --api-key secret

Binds 127.0.0.1 unless told otherwise: the API can generate, so exposing it is a decision.
"""
from __future__ import annotations

import argparse
import logging

from ..config import add_cli_arguments as add_engine_arguments
from ..config import from_cli


def add_arguments(parser: argparse.ArgumentParser, *, common: bool = True) -> None:
    """Serve options. ``common=False`` leaves ``--model`` and the engine options to a parent parser but
    still accepts them after ``serve`` (``SUPPRESS`` keeps the parent's defaults)."""
    parser.add_argument("--model", default="default" if common else argparse.SUPPRESS,
                        help='local model folder or "default"')
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


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from ..engine.pipeline import PagedPipeline
    from ..models import DEFAULT_MODEL_NAME
    from .app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipe = PagedPipeline.from_pretrained(args.model, config=from_cli(args))
    model_id = args.model_id or (DEFAULT_MODEL_NAME if args.model == "default" else args.model)
    app = create_app(pipe, model_id=model_id, max_concurrent_requests=args.max_concurrent_requests,
                     api_key=args.api_key, max_input_tokens=args.max_input_tokens, ui=not args.no_ui,
                     max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                     validation_workers=args.validation_workers)
    print(f"hf_paged serving {model_id} on http://{args.host}:{args.port}"
          + ("" if args.no_ui else f"  (UI: http://{args.host}:{args.port}/ui)"), flush=True)
    # A short graceful period: streams still open after it are cancelled by the app's shutdown.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_paged.server", description=__doc__.splitlines()[0])
    add_arguments(parser)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
