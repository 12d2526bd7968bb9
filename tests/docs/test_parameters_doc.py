"""docs/parameters.md lists every flag the server parser has, and the generator reproduces it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ernieserve.entrypoints.openai.cli_args import make_arg_parser

ROOT = Path(__file__).resolve().parents[2]


def test_every_flag_is_documented_with_help():
    doc = (ROOT / "docs" / "parameters.md").read_text()
    parser = make_arg_parser(argparse.ArgumentParser())
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}`" in doc, f"{flag} missing from docs/parameters.md"
                assert action.help, f"{flag} has no help text"


def test_document_is_what_the_generator_writes():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_parameters_doc.py")], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert out == (ROOT / "docs" / "parameters.md").read_text(), \
        "docs/parameters.md is stale: run python3 scripts/gen_parameters_doc.py > docs/parameters.md"
