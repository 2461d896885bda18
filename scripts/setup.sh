#!/usr/bin/env bash
# Install metalab and what its tests need. On a machine without torch, torch 2.13.0 comes first:
# pyproject only asks for torch>=2.4, and left to itself pip would pick the newest release, a
# multi-GB CUDA build, even on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[dev]"
