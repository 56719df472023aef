"""The conformance kit over every registered backend that can run on this machine."""

from __future__ import annotations

import pytest

import roi_ops
from roi_ops.testing import BackendConformance

BACKENDS = [info.name for info in roi_ops.list_backends()]


class TestEveryBackend(BackendConformance):
    @pytest.fixture(params=BACKENDS)
    def backend_name(self, request) -> str:
        return request.param
