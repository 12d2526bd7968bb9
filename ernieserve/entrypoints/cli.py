"""The `ernieserve` command: serve, generate, make-dummy, bench."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from ernieserve.config import ConfigError, EngineArgs


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="Generate text offline for one or more prompts.")
    EngineArgs.add_cli_args(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="A prompt (repeatable). Default: a short greeting.")
    p.add_argument("--chat", action="store_true", help="Wrap each prompt in the model's chat template.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.set_defaults(func=generate_main)


def generate_main(args: argparse.Namespace) -> int:
    from ernieserve.entrypoints.llm import LLM
    from ernieserve.sampling_params import SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed)
    prompts = args.prompt or ["Hello, my name is", "The capital of France is"]
    kwargs = {k: v for k, v in dataclasses.asdict(engine_args).items() if k not in ("model", "tokenizer")}
    llm = LLM(model=engine_args.model, tokenizer=engine_args.tokenizer, **kwargs)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        c = out.outputs[0]
        print(f"Prompt: {prompt!r}\nGenerated ({len(c.token_ids)} tokens, {c.finish_reason}): {c.text!r}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernieserve", description="ERNIE 4.5 inference and serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    from ernieserve.checkpoint.cli import add_make_dummy_parser

    add_make_dummy_parser(sub)
    try:
        from ernieserve.bench.cli import add_bench_parser
    except ImportError:  # bench is optional while it is being built
        add_bench_parser = None
    if add_bench_parser is not None:
        add_bench_parser(sub)
    try:
        from ernieserve.entrypoints.openai.cli_args import add_serve_parser
    except ImportError:
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        parser.exit(2, f"ernieserve {args.command}: error: {e}\n")
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"ernieserve {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
