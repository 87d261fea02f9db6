#!/usr/bin/env bash
# The main job: register the built-in synthetic patient with the shipped model and write
# overlay pictures and a report to demo-output/ (or the folder given as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/deepnav fusion demo --out "${1:-demo-output}"
