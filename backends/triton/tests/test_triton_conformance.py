"""roi_ops' public conformance kit, run on the Triton backend as a plugin's own suite runs it
(the one place it runs for Triton)."""

from __future__ import annotations

import pytest

from roi_ops.testing import BackendConformance

pytest.importorskip("triton")


class TestTritonConformance(BackendConformance):
    """The kit through ``roi_ops.roi_pool(..., backend="triton")``: under the interpreter on CPU
    tensors without a GPU, compiled on CUDA tensors with one."""

    hypothesis_examples = 8  # the interpreter is slow

    @pytest.fixture
    def backend_name(self) -> str:
        return "triton"
