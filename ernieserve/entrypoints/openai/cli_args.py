"""The API server's command line: FastDeploy's flag names and defaults, plus the vLLM flags that
`vllm serve MODEL ...` users type.

Every flag that appears in FastDeploy's and vLLM's ERNIE deployment guides parses. A flag whose
feature is not built yet is refused with a message saying so (listing every such flag at once),
never accepted and ignored. The engine's own refusals (tensor parallelism, quantization, swap
space) come from `EngineArgs.create_engine_config()`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ernieserve.config import ConfigError, EngineArgs
from ernieserve.reasoning import check_reasoning_parser_name


@dataclass(frozen=True, slots=True)
class PlannedFlag:
    """A flag users pass whose feature is planned: it parses, and any value that asks for the
    feature is refused."""

    flag: str
    feature: str
    kwargs: dict[str, Any]
    asks_for_nothing: Callable[[Any], bool]


def _unset(value: Any) -> bool:
    return value in (None, False, "", [])


PLANNED_FLAGS: tuple[PlannedFlag, ...] = (
    PlannedFlag("--limit-mm-per-prompt", "multimodal (image/video) inputs", {"type": str}, _unset),
    PlannedFlag("--mm-processor-kwargs", "multimodal (image/video) inputs", {"type": str}, _unset),
    PlannedFlag("--tool-call-parser", "tool calling", {"type": str}, _unset),
    PlannedFlag("--enable-auto-tool-choice", "tool calling", {"action": "store_true"}, _unset),
    PlannedFlag("--speculative-config", "speculative decoding (MTP)", {"type": str}, _unset),
    PlannedFlag("--splitwise-role", "disaggregated prefill/decode", {"type": str},
                lambda v: _unset(v) or v == "mixed"),
    PlannedFlag("--innode-prefill-ports", "disaggregated prefill/decode", {"type": str, "nargs": "+"}, _unset),
    PlannedFlag("--cpu-offload-gb", "CPU weight offloading", {"type": float}, lambda v: not v),
    PlannedFlag("--guided-decoding-backend", "structured output", {"type": str}, lambda v: v in (None, "off")),
    PlannedFlag("--workers", "several API server workers", {"type": int}, lambda v: v in (None, 1)),
)


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    server = parser.add_argument_group("API server")
    server.add_argument("--host", type=str, default="0.0.0.0", help="Address to listen on.")
    server.add_argument("--port", type=int, default=8000, help="HTTP port of the OpenAI-compatible API.")
    server.add_argument("--metrics-port", type=int, default=None,
                        help="Port of /metrics (default: the API port, /metrics on the main app).")
    server.add_argument("--api-key", action="append", default=None,
                        help="Accept only requests with `Authorization: Bearer KEY` (repeatable; FD_API_KEY "
                             "adds comma-separated keys).")
    server.add_argument("--max-concurrency", type=int, default=512,
                        help="Requests served at once; more are answered 429.")
    server.add_argument("--timeout-graceful-shutdown", type=int, default=30,
                        help="Seconds that in-flight requests get to finish after SIGTERM.")
    server.add_argument("--chat-template", type=str, default=None,
                        help="A chat template file, or the template itself (default: the tokenizer's).")
    server.add_argument("--reasoning-parser", type=str, default=None,
                        help="Split chat output into reasoning_content and content: ernie-45-vl (ERNIE-4.5-VL; "
                             "requests then think unless enable_thinking is false) or qwen3.")
    server.add_argument("--engine-worker-queue-port", type=int, default=None,
                        help="TCP port (127.0.0.1) of the requests queue to the engine core process "
                             "(default: a private ipc socket).")
    server.add_argument("--cache-queue-port", type=int, default=None,
                        help="TCP port (127.0.0.1) of the outputs queue from the engine core process "
                             "(default: --engine-worker-queue-port + 1).")
    server.add_argument("--disable-log-requests", action="store_true", help="Do not log each request.")
    server.add_argument("--trust-remote-code", action="store_true",
                        help="Accepted for vLLM compatibility; ernieserve runs its own model code and never "
                             "runs code from a checkpoint.")
    server.add_argument("--enable-logprob", action="store_true",
                        help="Accepted for FastDeploy compatibility; logprobs are always available.")
    server.add_argument("--load-choices", type=str, default="default", choices=["default", "default_v1"],
                        help="Accepted for FastDeploy compatibility; there is one weight loader.")
    EngineArgs.add_cli_args(parser)
    planned = parser.add_argument_group("planned (refused until built)")
    for pf in planned_flags():
        planned.add_argument(pf.flag, default=None, help=f"Not supported yet: {pf.feature}.", **pf.kwargs)
    return parser


def planned_flags() -> list[PlannedFlag]:
    """The planned flags the engine does not define yet: once EngineArgs takes a flag over (as
    it did --use-cudagraph), it is the engine's to accept or refuse."""
    engine_fields = set(EngineArgs.__dataclass_fields__)
    return [pf for pf in PLANNED_FLAGS if _dest(pf.flag) not in engine_fields]


def check_args(args: argparse.Namespace) -> None:
    """Refuse what we cannot do yet, and resolve the positional model and API keys."""
    refused = []
    for pf in planned_flags():
        value = getattr(args, _dest(pf.flag), None)
        if not pf.asks_for_nothing(value):
            shown = "" if isinstance(value, bool) else f" {value if not isinstance(value, list) else ' '.join(value)}"
            refused.append(f"{pf.flag}{shown} is not supported yet (support for {pf.feature} is planned)")
    if refused:
        advice = "Remove the flag" if len(refused) == 1 else "Remove these flags"
        raise ConfigError("; ".join(refused) + f". {advice} to serve without the feature.")
    tag = getattr(args, "model_tag", None)
    if tag is not None:
        if args.model is not None and args.model != tag:
            raise ConfigError(f"the model is given twice and differently: {tag!r} and --model {args.model!r}.")
        args.model = tag
    if args.reasoning_parser is not None:
        try:
            check_reasoning_parser_name(args.reasoning_parser)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be at least 1, got {args.max_concurrency}.")
    if args.timeout_graceful_shutdown < 0:
        raise ConfigError("--timeout-graceful-shutdown must be non-negative.")
    args.api_key = api_keys(args.api_key)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def api_keys(flag_keys: list[str] | None) -> list[str]:
    keys = list(flag_keys or [])
    keys += [k.strip() for k in os.environ.get("FD_API_KEY", "").split(",") if k.strip()]
    return list(dict.fromkeys(keys))


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's contents, or the value itself when it is a template."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if any(mark in value for mark in ("{{", "{%")):
        return value
    raise ConfigError(f"--chat-template {value!r}: no such file, and not a Jinja template either.")


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="Start the OpenAI-compatible API server.",
                              description="Start the OpenAI-compatible API server (FastDeploy's flag names).")
    p.add_argument("model_tag", nargs="?", default=None,
                   help="Local checkpoint folder (same as --model; default: the built-in dummy model).")
    make_arg_parser(p)
    p.set_defaults(func=serve_main)
    return p


def serve_main(args: argparse.Namespace) -> int:
    from ernieserve.entrypoints.openai.api_server import run_from_args

    return run_from_args(args)
