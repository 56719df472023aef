"""The bad-ROI log: keys, decoding, the torch-op recorder, and the CPU path."""

from __future__ import annotations

import math

import pytest
import torch

import roi_ops
from roi_ops import bad_rois


def _rows(dtype):
    rows = torch.tensor(
        [
            [0.0, 1, 2, 3, 4],
            [1.0, 5, 6, 7, 8],
            [3.0, 1.5, -2.25, 8, 9],  # batch 3 of N=2
            [0.0, math.nan, 1, 2, 3],
            [-1.0, 0, 0, 1, 1],
        ],
        dtype=torch.float64,
    )
    return rows.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_record_and_decode_give_the_first_bad_row_and_its_values(dtype):
    rois = _rows(dtype)
    log = bad_rois.new_log()
    bad_rois.record_bad_rois(log, rois, 2)
    found = bad_rois.decode(log)
    assert found.row == 2 and found.num_images == 2
    assert list(found.values) == rois[2].double().tolist()
    assert "batch index 3 outside [0, 2)" in found.reason()


def test_records_combine_by_minimum_in_any_order():
    rois = _rows(torch.float32)
    late, early = bad_rois.new_log(), bad_rois.new_log()
    bad_rois.record_bad_rois(late, rois[3:], 2)  # rows 0 (nan) and 1 of the slice
    bad_rois.record_bad_rois(early, rois, 2)
    combined = torch.minimum(late, early)
    assert bad_rois.decode(combined).row == 0  # the slice's row 0 has the smaller key
    torch.minimum(early, late, out=early)
    assert torch.equal(early, combined)


def test_empty_log_decodes_to_none_and_valid_rows_record_nothing():
    log = bad_rois.new_log()
    bad_rois.record_bad_rois(log, _rows(torch.float32)[:2], 2)
    assert bad_rois.decode(log) is None
    assert log.tolist() == [bad_rois.EMPTY] * bad_rois.SLOTS


def test_nan_and_infinities_decode():
    rois = torch.tensor([[0.0, 1, 2, 3, 4], [0.0, -math.inf, math.inf, math.nan, 1]])
    log = bad_rois.new_log()
    bad_rois.record_bad_rois(log, rois, 1)
    found = bad_rois.decode(log)
    assert found.row == 1 and found.values[1:3] == (-math.inf, math.inf)
    assert math.isnan(found.values[3]) and found.reason() == "a non-finite value"


class Reporting(roi_ops.Backend):
    """A CPU backend that reports bad rows through the log, like numba."""

    name = "reporting"
    priority = 10_000
    reports_bad_rois = True

    def __init__(self):
        self.logs = []

    def forward(self, problem, output, argmax):
        from roi_ops.torch_backend import TorchBackend

        self.logs.append(problem.bad_roi_log)
        if problem.bad_roi_log is not None:
            bad_rois.record_bad_rois(problem.bad_roi_log, problem.rois, problem.input.shape[0])
        TorchBackend().forward(problem, output, argmax)


def test_a_reporting_cpu_backend_raises_at_the_call():
    backend = roi_ops.register_backend(Reporting())
    try:
        x = torch.randn(2, 3, 8, 8)
        rois = _rows(torch.float32)
        with pytest.raises(ValueError, match=r"row 2 = \[3.0, 1.5, -2.25, 8.0, 9.0\] in this call"):
            roi_ops.roi_pool(x, rois, 2)
        assert backend.logs[-1] is not None
        out = roi_ops.roi_pool(x, rois[:2], 2)  # the log was cleared
        assert out.shape == (2, 3, 2, 2)
        with roi_ops.value_checks(False):
            roi_ops.roi_pool(x, rois, 2)
        assert backend.logs[-1] is None
    finally:
        roi_ops.unregister_backend("reporting")
