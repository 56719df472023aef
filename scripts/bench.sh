#!/usr/bin/env bash
# The main job: set up, print the backend report, run the CPU benchmark (JSON in bench-cpu.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
"$PYTHON" -m roi_ops info
"$PYTHON" -m roi_ops bench --device cpu --json bench-cpu.json "$@"
