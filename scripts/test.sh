#!/usr/bin/env bash
# Installs ernieserve with its test extras (CPU torch from the local wheel where one exists) and
# runs the CPU test suite. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" 2>/dev/null || python3 -m pip install -q "torch>=2.11"
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q "$@"
