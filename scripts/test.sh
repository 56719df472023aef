#!/usr/bin/env bash
# Set up and run every check that needs no GPU: lint, format, the docs build, the test suite (Triton through its
# CPU interpreter, the CUDA source through nvcc when present). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh --test
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
NO_MKDOCS_2_WARNING=1 "$PYTHON" -m mkdocs build --strict --quiet -d site
"$PYTHON" -m pytest -q "$@"
