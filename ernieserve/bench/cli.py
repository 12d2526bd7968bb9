"""`ernieserve bench {serve,throughput,latency}`.

``add_bench_parser`` plugs the ``bench`` command into the main CLI's subparsers; every leaf sets
``func(args) -> int``. ``main`` runs the bench commands alone (``python -m ernieserve.bench.cli``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ernieserve.bench import latency, serve, throughput

_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None],
                      Callable[[argparse.Namespace], int]]] = [
    ("serve", "load-test a running OpenAI-compatible server", serve.add_cli_args, serve.main),
    ("throughput", "offline throughput through the LLM API", throughput.add_cli_args,
     throughput.main),
    ("latency", "prefill and per-step decode latency through the LLM API", latency.add_cli_args,
     latency.main),
]


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="benchmark a server or the offline engine")
    bench.set_defaults(func=lambda _args: _print_help(bench))
    commands = bench.add_subparsers(dest="bench_command", metavar="{serve,throughput,latency}")
    for name, help_text, add_args, run in _COMMANDS:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        add_args(parser)
        parser.set_defaults(func=run)
    return bench


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ernieserve")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
