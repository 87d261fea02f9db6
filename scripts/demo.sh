#!/usr/bin/env bash
# The main job: the live MR-US fusion demo. The OpenIGTLink fusion service runs on the built-in
# synthetic patient, a simulated scanner streams its US breathing sequence over loopback, and
# overlay pictures and a latency report go to demo-output/ (or the folder given as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/deepnav fusion demo --out "${1:-demo-output}"
