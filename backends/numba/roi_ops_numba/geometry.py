"""ROI geometry in numba: each ROI's source (pyramid level and image) and bin edges (steps 1-5 of
docs/contract.md, on the map of the ROI's level), the bad-ROI log of `roi_ops.bad_rois`, and the
work estimate that decides serial or parallel.

Importing this module imports numba.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from roi_ops_numba.staging import HAS_F16C, float64_of_bits, float_bits

INDEX_LIMIT = 2**40
_INDEX_LIMIT_F = float(2**40)

# The level table every kernel takes: one int64 row per level (a one-map call has one row).
# Element (n, c, h, w) of level l is at OFFSET + n*S_N + c*S_C + h*S_H + w*S_W of the shared
# storage (`memory.shared_storage`); WIDTH and HEIGHT are the level's W and H.
LAYOUT_COLUMNS = ("offset", "s_n", "s_c", "s_h", "s_w", "width", "height")
OFFSET, S_N, S_C, S_H, S_W, WIDTH, HEIGHT = range(7)

# Geometry dtype G, as passed to `roi_geometry`.
MODE_HALF = 0
MODE_FLOAT = 1
MODE_DOUBLE = 2

_HALF_OVERFLOW = 65520.0  # the smallest magnitude that rounds to inf in float16
_HALF_MIN_NORMAL = 2.0**-14
_HALF_SUBNORMAL_SCALE = 2.0**24  # 1 / (float16 subnormal spacing)
_HALF_DROPPED = 42  # float64 mantissa bits that a normal float16 does not keep
_HALF_DROPPED_HALF = 1 << (_HALF_DROPPED - 1)
_LOW = 0xFFFFFFFF


@intrinsic
def _through_half(typingctx, value):
    """float64 `value` rounded to float32, then to float16 (one instruction each with F16C), and
    widened back to float64."""
    if value != types.float64:
        return None

    def codegen(context, builder, signature, arguments):
        single = builder.fptrunc(arguments[0], ir.FloatType())
        return builder.fpext(builder.fptrunc(single, ir.HalfType()), ir.DoubleType())

    return types.float64(value), codegen


@njit(cache=True)
def _round_half(x):
    """float64 `x`, the result of one float64 operation on float16 values (or an integer),
    rounded to the nearest float16 value (ties to even), returned as float64.

    With F16C, through float32: rounding such a result to float64, then float32, then float16
    equals rounding it once to float16, since each format carries at least 2p + 2 bits of the
    next one's p (53 >= 50, 24 >= 24); an integer is exact in float32 below 2^24, and float16
    overflows from 65520. Without F16C, on float64 bits (`_round_half_bits`).
    """
    if HAS_F16C:
        return _through_half(x)
    return _round_half_bits(x)


@njit(cache=True)
def _round_half_bits(x):
    """float64 `x` rounded to the nearest float16 value (ties to even), returned as float64."""
    if not math.isfinite(x):
        return x
    a = abs(x)
    if a >= _HALF_OVERFLOW:
        r = math.inf
    elif a < _HALF_MIN_NORMAL:
        # Scaling by a power of two is exact; np.rint rounds halves to even.
        r = np.rint(a * _HALF_SUBNORMAL_SCALE) / _HALF_SUBNORMAL_SCALE
    else:
        # A normal float16 keeps the top 10 of float64's 52 mantissa bits: the other 42 are
        # rounded off to nearest, ties to even (a carry into the exponent is the rounding up).
        bits = float_bits(a)
        bits += _HALF_DROPPED_HALF - 1 + ((bits >> _HALF_DROPPED) & 1)
        r = float64_of_bits(bits & ~(_HALF_DROPPED_HALF * 2 - 1))
    return math.copysign(r, x)


@njit(cache=True)
def _to_g(x, mode):
    """Round float64 `x` to the geometry dtype (float16, float32 or float64), as float64.

    One float64 operation on G values followed by this rounding equals the operation done in G:
    float64 carries more than 2p + 2 bits for p = 11 and p = 24.
    """
    if mode == MODE_DOUBLE:
        return x
    if mode == MODE_FLOAT:
        return np.float64(np.float32(x))
    return _round_half(x)


@njit(cache=True)
def _c_round(v):
    """C `round`: halves away from zero; NaN and infinities unchanged."""
    if not math.isfinite(v):
        return v
    t = np.trunc(v)
    if abs(v - t) >= 0.5:  # v - t is exact
        t += math.copysign(1.0, v)
    return t


@njit(cache=True)
def _index(v):
    """The contract's `index(v)`: NaN -> 0, saturated to [-2^40, 2^40], as int64."""
    if v != v:
        return np.int64(0)
    if v >= _INDEX_LIMIT_F:
        return np.int64(INDEX_LIMIT)
    if v <= -_INDEX_LIMIT_F:
        return np.int64(-INDEX_LIMIT)
    return np.int64(v)


@njit(cache=True)
def _bin_edges(corner, roi_size, bins, limit, mode, start, end, row0):
    """Fill start[row0:row0+bins], end[...] with the clamped bin edges along one axis."""
    bin_size = _to_g(_to_g(np.float64(roi_size), mode) / _to_g(np.float64(bins), mode), mode)
    for p in range(bins):
        lo = _index(np.floor(_to_g(_to_g(np.float64(p), mode) * bin_size, mode))) + corner
        hi = _index(np.ceil(_to_g(_to_g(np.float64(p + 1), mode) * bin_size, mode))) + corner
        start[row0 + p] = min(max(lo, 0), limit)
        end[row0 + p] = min(max(hi, 0), limit)


@njit(cache=True)
def _record_bad_row(rois, k, num_images, log):
    """Row `k`'s keys into the bad-ROI log (`roi_ops.bad_rois`): plain minimums (serial code)."""
    row = np.int64(k) << 32
    for j in range(5):
        bits = np.array([np.float64(rois[k, j])]).view(np.int64)[0]
        log[2 * j] = min(log[2 * j], row | (bits & _LOW))
        log[2 * j + 1] = min(log[2 * j + 1], row | ((bits >> 32) & _LOW))
    log[10] = min(log[10], row | num_images)


@njit(cache=True)
def _scale_in_g(spatial_scale, mode):
    """G(spatial_scale): the float itself for float64 rois, else rounded through float32."""
    if mode == MODE_DOUBLE:
        return spatial_scale
    return _to_g(np.float64(np.float32(spatial_scale)), mode)


@njit(cache=True, inline="always")
def _roi_valid(rois, k, num_images):
    """Whether row `k` is valid: five finite values and ``trunc(rois[k, 0])`` in [0, N)."""
    for j in range(5):
        if not math.isfinite(rois[k, j]):
            return False
    b = np.trunc(np.float64(rois[k, 0]))
    return b >= 0.0 and b < num_images


@njit(cache=True, inline="always")
def _level_of(levels, k, num_levels):
    """ROI `k`'s level: ``levels[k]`` (-1 when outside [0, L)), or 0 when `levels` is empty."""
    if levels.shape[0] == 0:
        return np.int64(0)
    level = np.int64(levels[k])
    return level if level >= 0 and level < num_levels else np.int64(-1)


@njit(cache=True, inline="always")
def _roi_edges(rois, k, level, num_images, height, width, pooled_h, pooled_w, scale, mode,
               source, hstart, hend, wstart, wend):  # fmt: skip
    """ROI `k`'s source (-1: invalid or no level) and bin edges on the map of `level` (H, W,
    the scale in G); returns the pixels its bins scan."""
    if level < 0 or not _roi_valid(rois, k, num_images):
        source[k] = -1
        hstart[k * pooled_h : (k + 1) * pooled_h] = 0
        hend[k * pooled_h : (k + 1) * pooled_h] = 0
        wstart[k * pooled_w : (k + 1) * pooled_w] = 0
        wend[k * pooled_w : (k + 1) * pooled_w] = 0
        return np.int64(0)
    source[k] = level * num_images + np.int64(np.trunc(np.float64(rois[k, 0])))
    x1 = _index(_c_round(_to_g(np.float64(rois[k, 1]) * scale, mode)))
    y1 = _index(_c_round(_to_g(np.float64(rois[k, 2]) * scale, mode)))
    x2 = _index(_c_round(_to_g(np.float64(rois[k, 3]) * scale, mode)))
    y2 = _index(_c_round(_to_g(np.float64(rois[k, 4]) * scale, mode)))
    roi_w = max(x2 - x1 + 1, 1)
    roi_h = max(y2 - y1 + 1, 1)
    _bin_edges(y1, roi_h, pooled_h, height, mode, hstart, hend, k * pooled_h)
    _bin_edges(x1, roi_w, pooled_w, width, mode, wstart, wend, k * pooled_w)
    rows = np.int64(0)
    for p in range(k * pooled_h, (k + 1) * pooled_h):
        rows += max(hend[p] - hstart[p], 0)
    cols = np.int64(0)
    for p in range(k * pooled_w, (k + 1) * pooled_w):
        cols += max(wend[p] - wstart[p], 0)
    return rows * cols + pooled_h * pooled_w


@njit(cache=True, inline="always")
def _one_roi(rois, k, levels, num_images, layout, pooled_h, pooled_w, spatial_scales, mode,
             source, hstart, hend, wstart, wend):  # fmt: skip
    level = _level_of(levels, k, layout.shape[0])
    at = max(level, 0)
    height, width = layout[at, HEIGHT], layout[at, WIDTH]
    scale = _scale_in_g(spatial_scales[at], mode)
    return _roi_edges(rois, k, level, num_images, height, width, pooled_h, pooled_w, scale,
                      mode, source, hstart, hend, wstart, wend)  # fmt: skip


@njit(cache=True)
def roi_geometry(
    rois, levels, num_images, layout, spatial_scales, pooled_h, pooled_w, mode,
    source, hstart, hend, wstart, wend, log, record,
):  # fmt: skip
    """Per-ROI source (level and image) and bin edges, computed in the geometry dtype of `mode`.

    Each ROI is placed on the map of its level (its H, W and scale); one level is the plain
    roi_pool case.

    Args:
        rois: (K, 5) float32 or float64 rows (batch_index, x1, y1, x2, y2); float16 and
            bfloat16 rows come converted (exactly) to float32.
        levels: (K,) int64 level of each ROI (-1, or any value outside [0, L): none; the ROI
            gives zeros), or an empty array: every ROI is on level 0.
        num_images: N of every level.
        layout: (L, 7) int64 level table (see `LAYOUT_COLUMNS`); H and W are read here.
        spatial_scales: (L,) float64 scales (the Python floats).
        pooled_h, pooled_w: PH, PW.
        mode: MODE_HALF, MODE_FLOAT or MODE_DOUBLE.
        source: (K,) int64 out: ``level * N + batch_index``, or -1 for an invalid ROI or one
            without a level (whose bins are all empty).
        hstart, hend: (K * PH,) int64 out; row edges clamped to [0, H of the ROI's level].
        wstart, wend: (K * PW,) int64 out; column edges clamped to [0, W of its level].
        log: int64 bad-ROI log (`roi_ops.bad_rois.SLOTS` entries), written when `record`: the
            first invalid row's keys (later rows' keys are all larger), whatever its level.
        record: whether to record into `log`.

    Returns:
        The pixels the forward scans per channel: the sum over ROIs with a source of the bins'
        areas (rows of all bin rows times columns of all bin columns), plus one per bin.
    """
    work = np.int64(0)
    for k in range(rois.shape[0]):
        work += _one_roi(rois, k, levels, num_images, layout, pooled_h, pooled_w,
                         spatial_scales, mode, source, hstart, hend, wstart, wend)  # fmt: skip
        if record and not _roi_valid(rois, k, num_images):
            _record_bad_row(rois, k, num_images, log)
            record = False
    return work


# ROIs per task of `roi_geometry_parallel`.
GEOMETRY_RUN = 512


@njit(parallel=True, cache=True)
def roi_geometry_parallel(
    rois, levels, num_images, layout, spatial_scales, pooled_h, pooled_w, mode,
    source, hstart, hend, wstart, wend, log, record,
):  # fmt: skip
    """`roi_geometry` with the ROIs spread over numba's threads (for many ROIs) in runs of
    `GEOMETRY_RUN` consecutive ROIs: one ROI is less work than handing a task to a thread
    (tasks are dealt one at a time, `ops.parallel_region`), and neighbouring ROIs' edges share
    cache lines (README: many-small). The bad-ROI log is written afterwards from the
    first invalid row, so it is the same."""
    count = rois.shape[0]
    runs = (count + GEOMETRY_RUN - 1) // GEOMETRY_RUN
    work = np.zeros(runs, np.int64)
    for run in prange(runs):
        total = np.int64(0)
        for k in range(run * GEOMETRY_RUN, min(count, (run + 1) * GEOMETRY_RUN)):
            total += _one_roi(rois, k, levels, num_images, layout, pooled_h, pooled_w,
                              spatial_scales, mode, source, hstart, hend, wstart, wend)  # fmt: skip
        work[run] = total
    if record:
        for k in range(count):
            if not _roi_valid(rois, k, num_images):
                _record_bad_row(rois, k, num_images, log)
                break
    return work.sum()


@njit(cache=True)
def roi_windows(hstart, hend, wstart, wend, pooled_h, pooled_w, rois):
    """(y0, y1, x0, x1) of each of `rois` (indices): the bounding box of its bins, empty (y1 <= y0
    or x1 <= x0) when every bin is; (K,) int64 arrays each."""
    count = rois.shape[0]
    y0 = np.empty(count, np.int64)
    y1 = np.empty(count, np.int64)
    x0 = np.empty(count, np.int64)
    x1 = np.empty(count, np.int64)
    for i in range(count):
        k = rois[i]
        a, b = hstart[k * pooled_h], hend[k * pooled_h]
        for p in range(k * pooled_h + 1, (k + 1) * pooled_h):
            a = min(a, hstart[p])
            b = max(b, hend[p])
        c, d = wstart[k * pooled_w], wend[k * pooled_w]
        for p in range(k * pooled_w + 1, (k + 1) * pooled_w):
            c = min(c, wstart[p])
            d = max(d, wend[p])
        y0[i], y1[i], x0[i], x1[i] = a, max(b, a), c, max(d, c)
    return y0, y1, x0, x1
