"""The conformance kit over every registered backend that can run on this machine (those that
cannot, a CUDA backend on a CPU-only machine, are skipped: this sweep opts in to skipping).

A plugin that runs the kit in its own tests (Triton, in backends/triton/tests) is left out."""

from __future__ import annotations

import pytest

import roi_ops
from roi_ops.testing import BackendConformance

OWN_KIT_RUN = {"triton"}  # backends/triton/tests/test_triton_conformance.py
BACKENDS = [info.name for info in roi_ops.list_backends() if info.name not in OWN_KIT_RUN]


class TestEveryBackend(BackendConformance):
    skip_unavailable = True

    @pytest.fixture(params=BACKENDS)
    def backend_name(self, request) -> str:
        return request.param
