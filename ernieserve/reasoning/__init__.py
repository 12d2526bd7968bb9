"""Reasoning parsers (``--reasoning-parser NAME``): a small registry of `ReasoningParser` classes.

``ernie-45-vl`` (ERNIE-4.5-VL, FastDeploy's name): ``<think>`` / ``</think>`` special tokens; the
chat template opens the block when ``enable_thinking`` is true and writes an empty closed block
otherwise. FastDeploy thinks by default for these models, so with this parser a request that
leaves ``enable_thinking`` unset gets ``enable_thinking=true``.
``qwen3``: the same markers (plain added tokens in Qwen3's vocabulary); the template's own default.

The classes live in `ernieserve.reasoning.parser`, imported only when a parser is built, so the
command line can check a name without importing the tokenizer stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ernieserve.reasoning.parser import ReasoningParser

# --reasoning-parser name -> class in ernieserve.reasoning.parser
_PARSERS: dict[str, str] = {
    "ernie-45-vl": "Ernie45VLReasoningParser",
    "qwen3": "Qwen3ReasoningParser",
}


def reasoning_parser_names() -> list[str]:
    return list(_PARSERS)


def check_reasoning_parser_name(name: str) -> None:
    """ValueError naming the flag and the choices for an unknown parser name."""
    if name not in _PARSERS:
        raise ValueError(f"--reasoning-parser {name!r} is not a known reasoning parser; choose from: "
                         f"{', '.join(_PARSERS)}.")


def reasoning_parser_class(name: str) -> type["ReasoningParser"]:
    check_reasoning_parser_name(name)
    return getattr(importlib.import_module("ernieserve.reasoning.parser"), _PARSERS[name])


def get_reasoning_parser(name: str, tokenizer: Any) -> "ReasoningParser":
    return reasoning_parser_class(name)(tokenizer)
