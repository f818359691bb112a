"""The `nanosae` command (also `python -m nanosae`): argparse subcommands, each a thin call into one module."""

from __future__ import annotations

import argparse
import sys

from .errors import NanosaeError


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="checkpoint dir, nanochat base dir or model_XXXXXX.pt")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--phase", choices=["base", "sft", "rl"], default=None, help="phase, for a base dir")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: <base>/tokenizer)")
    p.add_argument("--generation", default=None, help="override the detected nanochat generation")
    p.add_argument("--device", default="cpu")


def _load(args):
    from .checkpoint import load_model

    return load_model(
        args.model,
        args.step,
        phase=args.phase,
        device=args.device,
        generation=args.generation,
        tokenizer_dir=args.tokenizer,
    )


def cmd_sample(args) -> None:
    from .generate import generate_stream

    model, tok, _ = _load(args)
    prompt = tok.encode(args.prompt, prepend=tok.bos_token_id)
    stop = tok.stop_token_ids() if args.stop else None
    print(args.prompt, end="", flush=True)
    text = []
    for t in generate_stream(model, prompt, args.max_tokens, args.temperature, args.top_k, args.seed, stop):
        text.append(t)
        s = tok.decode(text)
        if not s.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(s, end="", flush=True)
            text = []
    print()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanosae", description="Sparse autoencoders for nanochat models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample", help="generate text from a nanochat checkpoint")
    _model_args(p)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--stop", action="store_true", help="stop at <|assistant_end|> or <|bos|>")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except NanosaeError as e:
        print(f"nanosae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nanosae: interrupted", file=sys.stderr)
        return 130
