#!/usr/bin/env bash
# Lint and the test suite, in .venv (created if missing; PYTHON and VENV as in bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV=$VENV bash scripts/bootstrap.sh
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest "$@"
