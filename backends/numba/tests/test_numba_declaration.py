"""The numba backend's declaration, packaging and tuning: what roi_ops and users see of it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from numba_cases import DTYPES
from roi_ops.backend import RoIPoolProblem

pytest.importorskip("numba")
numba_backend = pytest.importorskip("roi_ops_numba.backend")
NumbaBackend = numba_backend.NumbaBackend


def test_declaration():
    backend = NumbaBackend()
    assert backend.name == "numba"
    assert backend.priority == 50
    assert backend.device_types == frozenset({"cpu"})
    assert backend.dtypes == frozenset(DTYPES)
    assert backend.deterministic is True
    assert backend.deterministic_backward is True
    assert backend.reports_bad_rois is True
    assert backend.check_available() is None


def test_tuning_is_one_frozen_value_passed_down():
    from roi_ops_numba.tuning import DEFAULT_TUNING, NumbaTuning

    assert NumbaBackend().tuning is DEFAULT_TUNING
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_TUNING.serial_work = 1
    custom = NumbaTuning(serial_work=0)
    assert NumbaBackend(custom).tuning is custom


def test_backend_module_does_not_import_numba():
    code = (
        "import sys, roi_ops_numba.backend as b; b.NumbaBackend();"
        "assert 'numba' not in sys.modules, 'numba imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reports_missing_numba():
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "from roi_ops_numba.backend import NumbaBackend\n"
        "reason = NumbaBackend().check_available()\n"
        "assert reason and 'numba' in reason, reason"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_entry_point_registered():
    from importlib.metadata import entry_points

    points = {ep.name: ep.value for ep in entry_points(group="roi_ops.backends")}
    assert points.get("numba") == "roi_ops_numba.backend:NumbaBackend"


def test_not_supported_reasons():
    backend = NumbaBackend()
    x = torch.rand(1, 2, 4, 4, device="meta")
    rois = torch.zeros(1, 5, device="meta")
    reasons = backend.not_supported_reasons(RoIPoolProblem(x, rois, 2, 2, 1.0, True))
    assert any("meta" in r for r in reasons)
    cpu = RoIPoolProblem(torch.rand(1, 2, 4, 4), torch.zeros(1, 5), 2, 2, 1.0, True)
    assert backend.not_supported_reasons(cpu) == []
