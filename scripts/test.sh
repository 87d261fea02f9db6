#!/usr/bin/env bash
# Lint and the test suite, in .venv (created if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
