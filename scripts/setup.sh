#!/usr/bin/env bash
# Installs torch 2.13.0 (pinned: an unpinned torch would pull several GB of CUDA wheels), then
# roi_ops and its first-party backend plugins in editable mode, plus the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PYTHON" -m pip install --quiet --disable-pip-version-check "setuptools>=64" wheel
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-build-isolation \
  -e . -e backends/numba -e backends/triton -e backends/cupy
if [ "${1:-}" = "--test" ]; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "pytest>=7" "hypothesis>=6" "ruff>=0.5" onnx onnxscript onnxruntime matplotlib mkdocs-material "mkdocstrings[python]" "nvidia-cuda-nvrtc==13.0.*"
fi
