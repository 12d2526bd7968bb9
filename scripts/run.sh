#!/usr/bin/env bash
# Installs ernieserve and starts the OpenAI-compatible server on the built-in default model (a
# dummy ERNIE-4.5-0.3B checkpoint written on first use), on 0.0.0.0:8000. Extra arguments are
# server flags, e.g. `bash scripts/run.sh --port 8180 --max-model-len 4096`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" 2>/dev/null || python3 -m pip install -q "torch>=2.11"
python3 -m pip install -q -e .
exec python3 -m ernieserve serve "$@"
