#!/usr/bin/env bash
# Installs ernieserve and runs its main job on the built-in default model (a dummy ERNIE-4.5-0.3B
# checkpoint written on first use). Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" 2>/dev/null || python3 -m pip install -q "torch>=2.11"
python3 -m pip install -q -e .
if python3 -c "import ernieserve.entrypoints.openai.api_server" 2>/dev/null; then
    exec python3 -m ernieserve serve "$@"
fi
exec python3 -m ernieserve generate --max-model-len 2048 "$@"
