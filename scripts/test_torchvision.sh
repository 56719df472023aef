#!/usr/bin/env bash
# CI stage: roi_ops against torchvision, on the CPU, in an environment of its own (.venv-tv/,
# gitignored; reused when it exists): torch 2.14.1 and torchvision 0.29.1 pinned (a CUDA build
# that also runs on the CPU; never an unpinned torch), roi_ops and its numba backend, the test
# tools. Runs the comparisons with torchvision (tests/torchvision_oracle: bit-equality, its
# RoIPool battery, the drop-in patch) and the drop-in tests under this newer torch. Extra
# arguments go to pytest. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${ROI_OPS_TV_VENV:-.venv-tv}
start=$(date +%s)
"$PYTHON" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install "setuptools>=64" wheel
pip_install --no-build-isolation -e . -e backends/numba
pip_install "pytest>=7" "hypothesis>=6" onnx onnxscript onnxruntime
"$VENV/bin/python" - <<'PY'
import torch, torchvision
assert (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0]) == ("2.14.1", "0.29.1"), (
    torch.__version__, torchvision.__version__)
PY
echo "test_torchvision.sh: environment ready in $(( $(date +%s) - start )) s"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/torchvision_oracle tests/test_dropin.py tests/test_autocast.py tests/test_onnx.py "$@"
echo "test_torchvision.sh: done in $(( $(date +%s) - start )) s"
