#!/usr/bin/env bash
# CI stage: roi_ops against torchvision, on the CPU, in an environment of its own (.venv-tv/,
# gitignored; reused when it exists): torch 2.14.1 and torchvision 0.29.1 pinned (a CUDA build
# that also runs on the CPU; never an unpinned torch), roi_ops and its numba backend, the test
# tools. Runs the comparisons with torchvision (tests/torchvision_oracle: bit-equality, its
# RoIPool battery, the drop-in patch) and the drop-in tests under this newer torch; on a machine
# with CUDA the same tests also run on the GPU. Extra arguments go to pytest.
#
# ROI_OPS_TV_PYTHON=/path/to/python uses an existing environment instead (one with torch,
# torchvision, roi_ops and the test tools installed, e.g. on a GPU machine), installing nothing.
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if [ -n "${ROI_OPS_TV_PYTHON:-}" ]; then
  TV_PYTHON=$ROI_OPS_TV_PYTHON
else
  VENV=${ROI_OPS_TV_VENV:-.venv-tv}
  "${PYTHON:-python3}" -m venv "$VENV"
  TV_PYTHON=$VENV/bin/python
  pip_install() { "$TV_PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }
  pip_install "torch==2.14.1" "torchvision==0.29.1"
  pip_install "setuptools>=64" wheel
  pip_install --no-build-isolation -e . -e backends/numba
  pip_install "pytest>=7" "hypothesis>=6" onnx onnxscript onnxruntime
  "$TV_PYTHON" - <<'PY'
import torch, torchvision
versions = (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])
assert versions == ("2.14.1", "0.29.1"), versions
PY
fi
echo "test_torchvision.sh: environment ready in $(( $(date +%s) - start )) s"
"$TV_PYTHON" -m pytest -q -p no:cacheprovider \
  tests/torchvision_oracle tests/test_dropin.py tests/test_autocast.py tests/test_onnx.py "$@"
echo "test_torchvision.sh: done in $(( $(date +%s) - start )) s"
