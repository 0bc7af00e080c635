"""``hf-paged``: command line entry point.

    hf-paged demo                       # the default model: wrapped generate() + streamed batch
    hf-paged generate "Hello" "Hi"      # one reply per prompt (chat template applied)
    hf-paged chat                       # interactive chat, streamed
    hf-paged serve --port 8080          # TGI/OpenAI-compatible server + Gradio UI at /ui
"""
from __future__ import annotations

import argparse
import sys
import time

from .config import add_cli_arguments, from_cli
from .models import DEVICE_HELP, DTYPE_CHOICES, DTYPE_HELP, cli_device, cli_dtype


def _pipeline(args):
    from .engine.pipeline import PagedPipeline

    return PagedPipeline.from_pretrained(args.model, dtype=cli_dtype(args.dtype), device=cli_device(args.device),
                                         config=from_cli(args))


def cmd_generate(args) -> None:
    with _pipeline(args) as pipe:
        chats = [[{"role": "user", "content": p}] for p in args.prompts]
        for prompt, res in zip(args.prompts, pipe.generate(chats, max_new_tokens=args.max_new_tokens,
                                                            do_sample=args.temperature > 0,
                                                            temperature=args.temperature or 1.0)):
            print(f"> {prompt}\n{res.text}\n")


def cmd_chat(args) -> None:
    with _pipeline(args) as pipe:
        history: list[dict] = []
        print("hf_paged chat on", args.model, "- empty line or Ctrl-D quits", file=sys.stderr)
        for line in sys.stdin:
            line = line.strip()
            if not line:
                break
            history.append({"role": "user", "content": line})
            # No more new tokens than the context (or the whole KV pool) has room for: the reply is cut there.
            limit = min(pipe.max_model_len, pipe.pool.num_blocks * pipe.pool.block_size)
            reply = ""
            try:
                room = limit - len(pipe.encode(history))
                if room < 1:
                    raise ValueError(f"the conversation fills the model's context of {limit} tokens")
                for ev in pipe.stream(history, max_new_tokens=min(args.max_new_tokens, room), do_sample=False):
                    print(ev.text, end="", flush=True)
                    reply += ev.text
            except ValueError as exc:  # this turn cannot run: say why, keep the conversation so far
                history.pop()
                print(f"[{exc}; start a new chat to go on]", file=sys.stderr)
                continue
            print()
            history.append({"role": "assistant", "content": reply})


def cmd_demo(args) -> None:
    import torch

    import hf_paged

    from .models import load_model

    t0 = time.perf_counter()
    # float32, so that the wrapped model's greedy tokens equal the unwrapped model's
    model, tok = load_model(args.model, dtype=torch.float32, device=cli_device(args.device))
    print(f"model loaded in {time.perf_counter() - t0:.1f} s ({args.model}, {model.device})")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
                                     ).to(model.device)
    ref = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    hf_paged.wrap(model, config=from_cli(args))
    out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    n = inputs["input_ids"].shape[1]
    print("wrapped generate():", tok.decode(out[0, n:], skip_special_tokens=True))
    print("same tokens as before wrap():", torch.equal(ref, out))
    from .engine.pipeline import PagedPipeline

    questions = ["Name three colors.", "What is 2+2?", "Say hello in French.", "Why is the sky blue?"]
    with PagedPipeline(model, tok, config=from_cli(args)) as pipe:
        print("\nstreaming one reply while three others run in the same batch:")
        others = [pipe.submit([{"role": "user", "content": q}], max_new_tokens=48) for q in questions[1:]]
        for ev in pipe.stream([{"role": "user", "content": questions[0]}], max_new_tokens=48):
            print(ev.text, end="", flush=True)
        print()
        for q, h in zip(questions[1:], others):
            print(f"> {q}\n{h.result().text}")
        print("\nengine stats:", pipe.stats())


def cmd_serve(args) -> None:
    from .server.__main__ import serve

    serve(args)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hf-paged")
    ap.add_argument("--model", default="default", help='local model folder or "default"')
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                    help=DTYPE_HELP + "; for generate, chat and serve (demo stays float32)")
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_cli_arguments(ap)  # the engine options, with EngineConfig's defaults
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = _common(sub.add_parser("generate"))
    g.add_argument("prompts", nargs="+")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    c = _common(sub.add_parser("chat"))
    c.add_argument("--max-new-tokens", type=int, default=256)
    _common(sub.add_parser("demo"))
    from .server.__main__ import add_arguments as add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="HTTP server (TGI + OpenAI routes, UI at /ui)"), common=False)
    args = ap.parse_args(argv)
    try:
        from_cli(args), cli_device(args.device)
    except ValueError as exc:  # a bad engine option or device: a usage error, not a traceback
        ap.error(str(exc))
    {"generate": cmd_generate, "chat": cmd_chat, "demo": cmd_demo, "serve": cmd_serve}[args.cmd](args)


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--model``, ``--dtype``, ``--device`` and the engine options after the subcommand too (as ``serve``
    takes them); given there, they win over the same option before it."""
    parser.add_argument("--model", default=argparse.SUPPRESS, help='local model folder or "default"')
    parser.add_argument("--dtype", default=argparse.SUPPRESS, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--device", default=argparse.SUPPRESS, help=DEVICE_HELP)
    add_cli_arguments(parser, suppress_defaults=True)
    return parser


if __name__ == "__main__":
    main()
