"""The numba forward records invalid ROIs in the bad-ROI log exactly as roi_ops.bad_rois says."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from numba_cases import DTYPES, check, random_features, random_rois, run_forward
from roi_ops.bad_rois import EMPTY, decode, new_log, record_bad_rois
from roi_ops.testing import DTYPE_PAIRS, dtype_id, nans_with_payloads

pytest.importorskip("numba")

BAD_VALUES = [math.nan, -math.nan, math.inf, -math.inf]


def _logs(backend, x, rois, size=(2, 3), scale=0.5):
    """(the backend's log, the reference log) after one forward, with and without argmax."""
    num_images = x.shape[0]
    expected = new_log()
    record_bad_rois(expected, rois, num_images)
    for needs_argmax in (True, False):
        log = new_log()
        run_forward(backend, x, rois, size, scale, needs_argmax, log)
        assert torch.equal(log, expected), (log.tolist(), expected.tolist())
    return log, expected


def _rois(dtype, g, count=10, num_images=2):
    return random_rois(count, num_images, 6, 7, 0.5, g).to(dtype)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_id)
def test_valid_rois_leave_the_log_empty(backend, dtypes):
    input_dtype, rois_dtype = dtypes
    g = torch.Generator().manual_seed(1)
    x = random_features((2, 3, 6, 7), input_dtype, g)
    log, _ = _logs(backend, x, _rois(rois_dtype, g))
    assert (log == EMPTY).all()


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_id)
@pytest.mark.parametrize("batch", [-1.0, 2.0, 2.5, 7.0, -1e30, 1e30])
def test_batch_out_of_range(backend, dtypes, batch):
    input_dtype, rois_dtype = dtypes
    g = torch.Generator().manual_seed(2)
    x = random_features((2, 3, 6, 7), input_dtype, g)
    rois = _rois(rois_dtype, g)
    rois[4, 0] = batch
    log, _ = _logs(backend, x, rois)
    bad = decode(log)
    assert bad.row == 4 and bad.num_images == 2
    assert bad.values == tuple(rois[4].double().tolist())


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_id)
@pytest.mark.parametrize("column", range(5))
@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "-nan", "inf", "-inf"])
def test_non_finite_value_in_each_column(backend, dtypes, column, value):
    input_dtype, rois_dtype = dtypes
    g = torch.Generator().manual_seed(3)
    x = random_features((2, 3, 6, 7), input_dtype, g)
    rois = _rois(rois_dtype, g)
    rois[6, column] = value
    log, _ = _logs(backend, x, rois)
    assert decode(log).row == 6


def test_nan_payload_and_sign_bits_are_kept(backend):
    """The log holds the row's float64 bits exactly, NaN payload and sign included."""
    payload = struct.unpack("<f", struct.pack("<I", 0xFFC1_2345))[0]  # a negative NaN, payload
    g = torch.Generator().manual_seed(4)
    x = random_features((2, 3, 6, 7), torch.float32, g)
    rois = _rois(torch.float32, g)
    rois[3, 2] = payload
    log, _ = _logs(backend, x, rois)
    assert decode(log).row == 3


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_id)
@pytest.mark.parametrize("count", [1, 6, 7, 13])
def test_nan_bits_of_16_bit_rows_wherever_the_row_is(backend, dtypes, count):
    """The log holds torch's float64 widening of each value bit for bit. torch's float16 ->
    float32 conversion on the CPU gives a NaN at the end of a tensor other bits than one in the
    middle; the log must not depend on where the row is."""
    input_dtype, rois_dtype = dtypes
    g = torch.Generator().manual_seed(6)
    x = random_features((2, 3, 6, 7), input_dtype, g)
    rois = _rois(rois_dtype, g, count)
    rois[-1] = nans_with_payloads(rois_dtype)
    assert rois[-1].isnan().all()
    _logs(backend, x, rois)  # asserts the logs are equal word for word


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_id)
@pytest.mark.parametrize("seed", range(4))
def test_several_bad_rows_scrambled(backend, dtypes, seed):
    """Many bad rows of every kind in a random order: the log names the first."""
    input_dtype, rois_dtype = dtypes
    g = torch.Generator().manual_seed(100 + seed)
    x = random_features((3, 4, 6, 7), input_dtype, g)
    rois = random_rois(40, 3, 6, 7, 0.5, g)
    kinds = [(0, -1.0), (0, 3.0), (0, math.nan), (1, math.inf), (2, -math.inf), (3, math.nan),
             (4, math.inf), (0, 1e30), (0, -math.inf)]  # fmt: skip
    rows = torch.randperm(40, generator=g)[: len(kinds)]
    for row, (column, value) in zip(rows.tolist(), kinds, strict=True):
        rois[row, column] = value
    rois = rois.to(rois_dtype)
    log, _ = _logs(backend, x, rois)
    assert decode(log).row == int(rows.min())
    check(backend, x, rois, (2, 3), 0.5)  # the bad rows still pool to zeros


def test_an_earlier_entry_in_the_log_is_kept(backend):
    """Entries are minimums: a log that already holds an earlier row keeps it."""
    g = torch.Generator().manual_seed(5)
    x = random_features((2, 3, 6, 7), torch.float32, g)
    rois = _rois(torch.float32, g)
    rois[5, 0] = -1.0
    log = new_log()
    record_bad_rois(log, torch.tensor([[0.0, 0, 0, 1, 1], [9.0, 1, 2, 3, 4]]), 2)
    run_forward(backend, x, rois, (2, 2), 1.0, log=log)
    assert decode(log).row == 1 and decode(log).values == (9.0, 1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize("shape", [(0, 2, 4, 4), (1, 0, 4, 4), (1, 2, 0, 4)])
def test_logged_when_nothing_is_pooled(backend, shape):
    """No images (every row is bad), no channels or an empty map: rows are still checked."""
    rois = torch.tensor([[0, 0, 0, 3, 3], [3, 1, 1, 2, 2], [0, math.nan, 1, 2, 2]])
    _logs(backend, torch.ones(shape), rois)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_log_given(backend, dtype):
    """Without a log (the core's own checks), bad rows still pool to zeros and -1."""
    g = torch.Generator().manual_seed(6)
    x = random_features((2, 3, 6, 7), dtype, g)
    rois = _rois(dtype, g)
    rois[1, 0] = 5.0
    output, argmax = check(backend, x, rois, (2, 3), 0.5)
    assert (argmax[1] == -1).all() and (output[1] == 0).all()
