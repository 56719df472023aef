"""The forward kernels record invalid ROIs in roi_ops' bad-ROI log exactly as
`roi_ops.bad_rois.record_bad_rois` does, in every kernel and dtype, and record nothing when the
log is None."""

from __future__ import annotations

import math

import pytest
import torch

from roi_ops import bad_rois
from roi_ops.testing import DTYPE_PAIRS, assert_same_bits, dtype_id, reference_roi_pool

pytest.importorskip("triton")

from triton_cases import (  # noqa: E402
    COMPILED,
    DEVICES,
    in_layout,
    run_forward,
)

from roi_ops_triton.tuning import DEFAULT_TUNING, Tuning  # noqa: E402

KERNELS = {
    "unit": ("contiguous", DEFAULT_TUNING),
    "channels-last": ("channels_last", DEFAULT_TUNING),
    "flat": ("contiguous", Tuning(kernel="flat")),
}


def _expected_log(rois: torch.Tensor, num_images: int) -> torch.Tensor:
    log = bad_rois.new_log()
    bad_rois.record_bad_rois(log, rois.cpu(), num_images)
    return log


def _pool_and_log(x, rois, tuning=DEFAULT_TUNING, needs_argmax=True, log=None):
    log = bad_rois.new_log(x.device) if log is None else log
    output, _ = run_forward(x, rois, (2, 2), 0.5, needs_argmax, tuning, log)
    return output, log.cpu()


def _scrambled_rows(num_images: int) -> list[list[float]]:
    """Valid rows with bad ones between them: the first bad row is row 2."""
    return [
        [0.0, 1, 1, 6, 6],
        [1.9, 0, 0, 3, 3],
        [0.0, 2, math.inf, 5, 5],  # the first bad row
        [-1.0, 0, 0, 3, 3],
        [1.0, 0, 0, 6, 4],
        [num_images, 1, 1, 2, 2],
        [0.0, 1, 1, 4, math.nan],
        [-math.inf, 1, 1, 2, 2],
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype, rois_dtype", DTYPE_PAIRS, ids=dtype_id)
def test_the_log_matches_the_torch_recorder(device, kernel, dtype, rois_dtype):
    """Several bad rows in scrambled order among valid ones, every kernel and rois dtype; the
    outputs are still the reference's, with and without the argmax."""
    layout, tuning = KERNELS[kernel]
    g = torch.Generator().manual_seed(3)
    x = in_layout(torch.randn(2, 9, 7, 8, generator=g).to(dtype), layout).to(device)
    rois = torch.tensor(_scrambled_rows(2), dtype=torch.float64).to(rois_dtype).to(device)
    expected, _ = reference_roi_pool(x, rois, (2, 2), 0.5)
    for needs_argmax in (True, False):
        output, log = _pool_and_log(x, rois, tuning, needs_argmax)
        assert torch.equal(log, _expected_log(rois, 2))
        assert bad_rois.decode(log).row == 2
        assert_same_bits(output, expected)


BAD_ROWS = [
    pytest.param([2.0, 1, 1, 3, 3], id="batch-N"),
    pytest.param([7.5, 1, 1, 3, 3], id="batch-past-N"),
    pytest.param([-1.0, 1, 1, 3, 3], id="batch-minus-one"),
    pytest.param([-3e9, 1, 1, 3, 3], id="batch-huge-negative"),
] + [
    pytest.param(
        [value if j == column else [1.0, 1, 1, 3, 3][j] for j in range(5)],
        id=f"{name}-in-column-{column}",
    )
    for column in range(5)
    for name, value in (("nan", math.nan), ("inf", math.inf), ("minus-inf", -math.inf))
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row", BAD_ROWS)
def test_every_kind_of_bad_row_is_recorded(device, row):
    """Batch index outside [0, N), NaN, +inf and -inf in each column: the one bad row (row 1)
    is recorded with its values and N."""
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)).to(device)
    rois = torch.tensor([[0.0, 0, 0, 3, 3], row, [1.0, 0, 0, 2, 2]]).to(device)
    _, log = _pool_and_log(x, rois)
    assert torch.equal(log, _expected_log(rois, 2))
    bad = bad_rois.decode(log)
    assert bad.row == 1 and bad.num_images == 2
    assert all(
        (a == b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(bad.values, row, strict=True)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_valid_rows_record_nothing_and_earlier_records_stay(device):
    """A log holding an earlier call's row keeps it (atomic minimum); valid rows add nothing."""
    x = torch.randn(2, 3, 5, 5).to(device)
    earlier = torch.tensor([[0.0, math.nan, 0, 1, 1]]).to(device)
    _, log = _pool_and_log(x, earlier)
    valid = torch.tensor([[0.0, 0, 0, 4, 4], [1.0, 1, 1, 3, 2]]).to(device)
    _, after = _pool_and_log(x, valid, log=log.clone().to(device))
    assert torch.equal(after, log)
    _, fresh = _pool_and_log(x, valid)
    assert torch.equal(fresh, bad_rois.new_log())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 0, 4, 4), (2, 3, 0, 4), (0, 3, 4, 4)], ids=str)
def test_rows_are_recorded_when_there_is_nothing_to_pool(device, shape):
    """No channel, no pixel or no image: no forward kernel runs, the rows are still checked
    (with N = 0 every row is bad)."""
    x = torch.zeros(shape).to(device)
    rois = torch.tensor([[0.0, 0, 0, 1, 1], [1.0, 0, math.nan, 1, 1], [5.0, 0, 0, 1, 1]])
    rois = rois.to(device)
    output, log = _pool_and_log(x, rois)
    assert torch.equal(log, _expected_log(rois, shape[0]))
    assert not output.any()


@COMPILED
@pytest.mark.gpu
def test_a_pinned_host_log_is_written_by_the_kernel():
    """On CUDA the log may be pinned host memory mapped into the device's address space (as
    roi_ops' own per-device log is): the kernel writes it, and the host reads it after the
    stream is done, without a device-to-host copy."""
    x = torch.randn(2, 16, 9, 9, device="cuda")
    rois = torch.tensor(_scrambled_rows(2), device="cuda")
    for layout, tuning in KERNELS.values():
        log = bad_rois.new_log(pin_memory=True)
        assert log.is_pinned() and log.device.type == "cpu"
        output, _ = run_forward(in_layout(x, layout), rois, (2, 2), 0.5, True, tuning, log)
        torch.cuda.current_stream().synchronize()
        assert torch.equal(log, _expected_log(rois, 2))
        expected, _ = reference_roi_pool(x.cpu(), rois.cpu(), (2, 2), 0.5)
        assert_same_bits(output, expected)
