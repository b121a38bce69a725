#!/usr/bin/env bash
# Run kvmpy's checks: setup (idempotent), ruff, then the test suite.
# Tests marked `slow` (long stress and fuzz runs) are left out; run them with
# `python -m pytest -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m ruff check kvmpy tests
"$PYTHON" -m pytest -q -m "not slow" "$@"
