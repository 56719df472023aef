"""`roi_ops_numba.lines`: loads and stores of the first n lanes (no memory outside them
touched), the running-maximum rule on every pair of special values, and a scan built from them
against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from roi_ops_numba.lines import (
    LINE_BYTES,
    choose,
    int32_line,
    lanes_of,
    load_line,
    replaces_maximum,
    store_line,
)

DTYPES = [np.float32, np.float64, np.int32, np.int64]


@njit
def _lanes(array):
    return lanes_of(array)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lanes_of_a_line(dtype):
    assert _lanes(np.zeros(1, dtype)) == LINE_BYTES // np.dtype(dtype).itemsize


@njit
def _copy_lanes(src, start, count, dst, at):
    store_line(dst, at, count, load_line(src, start, count))


@pytest.mark.parametrize("dtype", DTYPES)
def test_load_and_store_touch_only_the_first_lanes(dtype):
    lanes = LINE_BYTES // np.dtype(dtype).itemsize
    bits = np.dtype(dtype).str.replace("f", "u").replace("i", "u")
    rng = np.random.default_rng(3)
    src = rng.integers(0, 2 ** (8 * np.dtype(dtype).itemsize), 3 * lanes, dtype=bits)
    for count in range(lanes + 1):
        for start in (0, 1, lanes - 1):
            for at in (0, 3):
                dst = np.full(3 * lanes, 0x5A, bits)
                _copy_lanes(src.view(dtype), start, count, dst.view(dtype), at)
                expected = np.full(3 * lanes, 0x5A, bits)
                expected[at : at + count] = src[start : start + count]
                assert dst.tolist() == expected.tolist(), (count, start, at)


@njit
def _zeros_past(src, count, dst):
    store_line(dst, 0, LINE_BYTES // dst.itemsize, load_line(src, 0, count))


def test_lanes_not_loaded_are_zero():
    src = np.arange(1, 17, dtype=np.float32)
    dst = np.full(16, 7.0, np.float32)
    _zeros_past(src, 5, dst)
    assert dst.tolist() == [1, 2, 3, 4, 5] + [0] * 11


@njit
def _step(x, b, where, best_out, pos_out):
    lanes = LINE_BYTES // x.itemsize
    xs = load_line(x, 0, lanes)
    bs = load_line(b, 0, lanes)
    g = replaces_maximum(xs, bs)
    store_line(best_out, 0, lanes, choose(g, xs, bs))
    store_line(pos_out, 0, lanes, choose(g, int32_line(where, bs), int32_line(-1, bs)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_replaces_maximum_on_every_pair_of_special_values(dtype):
    """The contract's rule lane by lane: greater replaces, NaN replaces a number, nothing
    replaces a NaN, ties (-0.0 against +0.0 too) keep the running value; the kept element's
    bits are exact (NaN payloads, signed zeros)."""
    lanes = LINE_BYTES // np.dtype(dtype).itemsize
    bits = np.dtype(dtype).str.replace("f", "u")
    nan_a = np.array([0x7FC00001 if dtype == np.float32 else 0x7FF8000000000001], bits)
    nan_b = np.array([0xFFA00000 if dtype == np.float32 else 0xFFF4000000000000], bits)
    values = [
        np.array([v], dtype).view(bits)
        for v in (0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.finfo(dtype).tiny / 4)
    ] + [nan_a, nan_b]
    pairs = [(x, b) for x in values for b in values]
    for first in range(0, len(pairs), lanes):
        chunk = pairs[first : first + lanes]
        chunk += [chunk[-1]] * (lanes - len(chunk))
        x = np.concatenate([p[0] for p in chunk]).view(dtype)
        b = np.concatenate([p[1] for p in chunk]).view(dtype)
        best, pos = np.empty(lanes, dtype), np.empty(lanes, np.int32)
        _step(x, b, 99, best, pos)
        for lane in range(lanes):
            xv, bv = x[lane], b[lane]
            wins = (not np.isnan(bv)) and (xv > bv or np.isnan(xv))
            kept = x if wins else b
            assert best.view(bits)[lane] == kept.view(bits)[lane], (xv, bv)
            assert pos[lane] == (99 if wins else -1), (xv, bv)


@njit
def _scan_columns(data, rows, count, best, pos):
    """Column maxima (first maximum, first NaN) of a rows x count array, one line at a time."""
    lanes = LINE_BYTES // data.itemsize
    for c in range(0, count, lanes):
        n = min(lanes, count - c)
        b = load_line(data, c, n)
        q = int32_line(0, b)
        for r in range(1, rows):
            x = load_line(data, r * count + c, n)
            g = replaces_maximum(x, b)
            b = choose(g, x, b)
            q = choose(g, int32_line(r, b), q)
        store_line(best, c, n, b)
        store_line(pos, c, n, q)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("count", [1, 7, 16, 21, 40])
def test_scan_matches_a_scalar_reference(dtype, count):
    rng = np.random.default_rng(count)
    rows = 9
    data = rng.integers(-3, 4, (rows, count)).astype(dtype)  # many ties
    data[rng.random((rows, count)) < 0.1] = np.nan
    data[rng.random((rows, count)) < 0.1] = -0.0
    best = np.full(count + 3, 77, dtype)
    pos = np.full(count + 3, -7, np.int32)
    _scan_columns(data.ravel(), rows, count, best, pos)
    for j in range(count):
        column = data[:, j]
        winner = 0
        for r in range(1, rows):
            x, b = column[r], column[winner]
            if not np.isnan(b) and (x > b or np.isnan(x)):
                winner = r
        assert pos[j] == winner, j
        assert column[winner : winner + 1].tobytes() == best[j : j + 1].tobytes(), j
    assert best[count:].tolist() == [77] * 3 and pos[count:].tolist() == [-7] * 3
