#!/usr/bin/env bash
# Installs torch 2.13.0 (pinned: an unpinned torch would pull several GB of CUDA wheels), then
# roi_ops and its first-party backend plugins in editable mode. With --test, also what
# scripts/test.sh runs: the test tools, matplotlib and ONNX (the `dev` extra) and the pinned docs
# tools (the `docs` extra of pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "setuptools>=64" wheel
if [ "${1:-}" = "--test" ]; then
  "${PIP[@]}" --no-build-isolation -e ".[dev,docs]" -e backends/numba -e backends/triton \
    -e backends/cupy "nvidia-cuda-nvrtc==13.0.*"
else
  "${PIP[@]}" --no-build-isolation -e . -e backends/numba -e backends/triton -e backends/cupy
fi
