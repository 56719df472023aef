"""The conformance kit over every registered backend that can run on this machine (those that
cannot, a CUDA backend on a CPU-only machine, are skipped: this sweep opts in to skipping)."""

from __future__ import annotations

import pytest

import roi_ops
from roi_ops.testing import BackendConformance

BACKENDS = [info.name for info in roi_ops.list_backends()]


class TestEveryBackend(BackendConformance):
    skip_unavailable = True

    @pytest.fixture(params=BACKENDS)
    def backend_name(self, request) -> str:
        return request.param
