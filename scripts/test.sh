#!/usr/bin/env bash
# Set up and run every check that needs no GPU: lint, format, the docs build, the test suite (Triton
# through its CPU interpreter, the CUDA source through nvcc when present), then the torchvision
# stage (scripts/test_torchvision.sh: roi_ops against torchvision 0.29.1 in an environment of its
# own). Arguments go to pytest, and then the torchvision stage is left out. Exits non-zero on any
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh --test
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
NO_MKDOCS_2_WARNING=1 "$PYTHON" -m mkdocs build --strict -d site  # not --quiet: it hides the warnings that --strict counts
"$PYTHON" -m pytest -q "$@"
if [ $# -eq 0 ]; then
  bash scripts/test_torchvision.sh
fi
