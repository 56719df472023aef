"""The forward kernels' bad-ROI log (roi_ops.bad_rois), bit for bit against the torch-op
recorder `record_bad_rois` on the CPU: every kernel family, every rois dtype, invalid batch
indices, NaN and infinities in each column, NaN payloads and subnormals, several invalid rows
in scrambled order, no channels at all. On the emulator without a GPU, through CuPy with one."""

from __future__ import annotations

import math

import pytest
import torch
from cupy_harness import LAYOUTS, run_forward, wide
from roi_ops import bad_rois
from roi_ops.testing import assert_same_bits
from roi_ops.testing.reference import reference_roi_pool

from roi_ops_cupy import kernels

NUM_IMAGES = 3
GOOD = [[0, 1.0, 1.0, 6.0, 5.0], [2, 0.5, 2.0, 9.0, 8.0], [1.9, 3.0, 0.0, 4.0, 7.5]]


def _bad_rows() -> list[list[float]]:
    """Rows each invalid for one reason: batch out of range, NaN or +-inf in each column."""
    rows = [[3, 1, 1, 6, 5], [-1, 1, 1, 6, 5], [1e4, 1, 1, 6, 5], [-2.5, 0, 0, 2, 2]]
    for column in range(5):
        for special in (math.nan, math.inf, -math.inf):
            row = [1, 1.0, 2.0, 6.0, 5.0]
            row[column] = special
            rows.append(row)
    return rows


def _rois(rows, dtype) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


def _expected_log(rois: torch.Tensor, num_images: int) -> torch.Tensor:
    log = bad_rois.new_log()
    bad_rois.record_bad_rois(log, rois, num_images)
    return log


def _kernel_log(runner, x, rois, size=(3, 2), layout="contiguous", needs_argmax=True):
    """The log after one forward launch, and the launch's outputs checked against the
    reference (invalid rows pool to zeros and -1)."""
    log = bad_rois.new_log(runner.device)
    output, argmax = run_forward(
        runner, x, rois, size, 0.5, layout=layout, needs_argmax=needs_argmax, bad_roi_log=log
    )
    if x.numel() == 0:  # no images: every bin empty
        assert bool((output == 0).all()) and (argmax is None or bool((argmax == -1).all()))
    else:
        expected, expected_argmax = reference_roi_pool(x, rois, size, 0.5)
        assert_same_bits(output, expected)
        if needs_argmax:
            assert torch.equal(argmax, expected_argmax)
    return log.cpu()


PAIRS = [(t, r) for t, r in kernels.FORWARD_PAIRS]
PAIR_IDS = [f"{str(t)[6:]}-{str(r)[6:]}" for t, r in PAIRS]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_each_invalid_row_alone(runner, pair, layout):
    """Every kind of invalid row, alone among valid ones, in each column; the log equals the
    torch-op recorder's, slot for slot."""
    dtype, rois_dtype = pair
    g = torch.Generator().manual_seed(3)
    x = torch.randn(NUM_IMAGES, 4, 8, 12, generator=g).to(dtype)
    if layout.startswith("channels_last"):
        x = wide(x)
    for i, bad in enumerate(_bad_rows()):
        rows = [GOOD[0], GOOD[1], bad, GOOD[2]]
        rois = _rois(rows, rois_dtype)
        log = _kernel_log(runner, x, rois, layout=layout, needs_argmax=i % 2 == 0)
        expected = _expected_log(rois, NUM_IMAGES)
        assert bad_rois.decode(log).row == 2
        assert torch.equal(log, expected), (bad, log.tolist(), expected.tolist())


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_the_first_of_many_invalid_rows_in_scrambled_order(runner, pair):
    """600 rows, a third of them invalid in every way, scattered: the first one wins, whatever
    order the blocks run in; NaN payloads (quiet, signalling, negative) and subnormal
    coordinates are recorded as their float64 bits."""
    dtype, rois_dtype = pair
    g = torch.Generator().manual_seed(5)
    x = torch.randn(NUM_IMAGES, 2, 8, 12, generator=g).to(dtype)
    count = 600
    rows = torch.tensor(GOOD, dtype=torch.float64)[torch.randint(0, 3, (count,), generator=g)]
    bad = torch.tensor(_bad_rows(), dtype=torch.float64)
    order = torch.randperm(count, generator=g)[: count // 3]
    rows[order] = bad[torch.randint(0, len(bad), (len(order),), generator=g)]
    rois = rows.to(rois_dtype)
    # NaN payloads and a subnormal in the first invalid row and a few others.
    payloads = {
        torch.float16: [0x7C01, 0x7D55, 0x0001],
        torch.bfloat16: [0x7F81, 0x7FA5, 0x0001],
        torch.float32: [0x7F800001, 0x7FAAAAAA, 0x00000001],
        torch.float64: [0x7FF0000000000001, 0x7FF5555555555555, 0x0000000000000001],
    }[rois_dtype]
    width = 8 * rois.element_size()
    raw = rois.view({16: torch.int16, 32: torch.int32, 64: torch.int64}[width])
    first = int(order.min())
    for row, column, which in [(first, 3, 0), (first, 1, 2), (int(order[0]), 2, 1)]:
        value = payloads[which]  # as a signed integer of the dtype's width
        raw[row, column] = value - (1 << width) if value >= 1 << (width - 1) else value
    log = _kernel_log(runner, x, rois, size=(2, 2))
    expected = _expected_log(rois, NUM_IMAGES)
    assert bad_rois.decode(expected).row == first
    assert torch.equal(log, expected), (log.tolist(), expected.tolist())


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_recorded_without_channels_or_images(runner, layout):
    """No channels (nothing to pool, a launch still records) and no images (every row invalid)."""
    rois = _rois([GOOD[0], [5, 1, 1, 2, 2], GOOD[1]], torch.float32)
    for shape in ((NUM_IMAGES, 0, 8, 12), (0, 4, 8, 12)):
        x = torch.randn(shape)
        log = _kernel_log(runner, x, rois, layout=layout)
        assert torch.equal(log, _expected_log(rois, shape[0]))
        assert bad_rois.decode(log).row == (1 if shape[0] else 0)


def test_valid_rows_record_nothing(runner):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(NUM_IMAGES, 20, 8, 12, generator=g)
    rois = _rois(GOOD * 5, torch.float32)
    for layout in LAYOUTS:
        log = _kernel_log(runner, x, rois, layout=layout)
        assert bool((log == bad_rois.EMPTY).all())
