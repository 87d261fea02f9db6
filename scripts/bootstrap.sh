#!/usr/bin/env bash
# Create .venv (if missing) and install DeepNav with its pinned dependencies into it.
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
# PYTHON: the interpreter to create it with (python3); VENV: its folder (.venv), e.g.
# PYTHON=python3.12 VENV=.venv-py3.12 for a second one beside the first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp=$VENV/.deepnav-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing DeepNav and its pinned dependencies into $VENV" >&2
    # torch first and pinned: an unpinned resolution would pull several GB of CUDA packages
    "$VENV/bin/pip" install --quiet torch==2.13.0
    "$VENV/bin/pip" install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
fi
