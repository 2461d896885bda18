#!/usr/bin/env bash
# Lint, format check and the full test suite (real-data tests read $METALAB_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m ruff check src tests benchmarks
"$PYTHON" -m ruff format --check src tests benchmarks
# One worker per core (pytest-xdist), each file's tests on one worker (module fixtures load once);
# tests/conftest.py gives each worker its share of the cores as torch threads.
"$PYTHON" -m pytest -q -n auto --dist loadfile "$@"
