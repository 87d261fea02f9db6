#!/usr/bin/env bash
# Create .venv (if missing) and install DeepNav with its pinned dependencies into it.
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "creating virtual environment .venv" >&2
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.deepnav-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing DeepNav and its pinned dependencies into .venv" >&2
    # torch first and pinned: an unpinned resolution would pull several GB of CUDA packages
    .venv/bin/pip install --quiet torch==2.13.0
    .venv/bin/pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
fi
