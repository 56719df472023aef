"""The per-ROI forward for every dtype: integer keys of the raw bits, one ROI per task.

A task is one ROI and a block of channels. Bins are scanned pixel by pixel with the channels of
the block as the innermost loop: a fixed trip count and branch-free selects, which LLVM
vectorises. channels_last inputs are read in place with contiguous loads; for other layouts
(NCHW) a task first copies its ROI window, or one bin row's band at a time, channels-last into
a small buffer (bounded, so it stays in cache) and gathers in place only when even a band is
too large. Bins are small (a few pixels), so per-pixel work over ~100s of channels is what
vectorises; a per-channel scan would be short, branchy loops.

Elements are compared through integer *keys* of their raw bits (`_key`), which works the same
way for float16, bfloat16, float32 and float64 and needs no half-precision arithmetic. Since the
output is always an input element (or 0), the winning element's bits are copied unchanged.
float16 and bfloat16 always take this kernel; float32 and float64 only when their ROIs are too
sparse for `pool_groups`. Importing this module imports numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from roi_ops_numba.geometry import OFFSET, S_C, S_H, S_N, S_W, WIDTH
from roi_ops_numba.staging import _stage


@njit(cache=True, inline="always")
def _key(bits, mag_mask, nan_threshold):
    """Order-preserving key of a float's raw bits (a signed integer view), branch-free.

    Sign-magnitude becomes two's complement, so -0.0 and +0.0 share key 0 (they are equal, and
    the first one scanned wins). Every NaN gets the key ``nan_threshold + 1``, above +inf: NaN is
    maximal and, all NaN keys being equal, the first NaN wins. Keys fit the view's width.
    """
    m = bits & mag_mask
    nan = m > nan_threshold
    m = min(m, nan_threshold + 1)
    return -m if (bits < 0 and not nan) else m


@njit(cache=True, inline="always")
def _keys_init(seg, n, mag_mask, nan_threshold, hw, track, rk, rb, rh):
    """Start a bin at its first pixel: key, raw bits and position of each channel of `seg`."""
    for j in range(n):
        x = seg[j]
        rk[j] = _key(x, mag_mask, nan_threshold)
        rb[j] = x
    if track:
        for j in range(n):
            rh[j] = hw


@njit(cache=True, inline="always")
def _keys_update(seg, n, mag_mask, nan_threshold, hw, track, rk, rb, rh):
    """Fold one pixel into a bin: a strictly greater key replaces (so the first max stays)."""
    for j in range(n):
        x = seg[j]
        key = _key(x, mag_mask, nan_threshold)
        greater = key > rk[j]
        rk[j] = key if greater else rk[j]
        rb[j] = x if greater else rb[j]
        # `track` does not change in the loop: LLVM unswitches it into two branch-free loops,
        # which vectorise as the two hand-written ones did.
        if track:
            rh[j] = hw if greater else rh[j]


@njit(cache=True, inline="always")
def _scan_contiguous(data, base, row, col, h0, h1, w0, w1, nc, width, mag_mask, nan_threshold,
                     track, rk, rb, rh):  # fmt: skip
    """Reduce one bin whose pixel (h, w) has its `nc` channels at data[base + h*row + w*col:]."""
    px = base + h0 * row + w0 * col
    _keys_init(data[px : px + nc], nc, mag_mask, nan_threshold, h0 * width + w0, track,
               rk, rb, rh)  # fmt: skip
    for h in range(h0, h1):
        for w in range(w0 + 1 if h == h0 else w0, w1):  # the first pixel is already in
            px = base + h * row + w * col
            _keys_update(data[px : px + nc], nc, mag_mask, nan_threshold, h * width + w, track,
                         rk, rb, rh)  # fmt: skip


@njit(cache=True, inline="always")
def _scan_strided(data, base, row, col, stride, h0, h1, w0, w1, nc, width, mag_mask,
                  nan_threshold, track, rk, rb, rh):  # fmt: skip
    """`_scan_contiguous` with the channels `stride` elements apart (gathered loads)."""
    px = base + h0 * row + w0 * col
    _keys_init(data[px : px + nc * stride : stride], nc, mag_mask, nan_threshold,
               h0 * width + w0, track, rk, rb, rh)  # fmt: skip
    for h in range(h0, h1):
        for w in range(w0 + 1 if h == h0 else w0, w1):
            px = base + h * row + w * col
            _keys_update(data[px : px + nc * stride : stride], nc, mag_mask, nan_threshold,
                         h * width + w, track, rk, rb, rh)  # fmt: skip


_IN_PLACE = 0  # channels contiguous in the input (channels_last)
_WINDOW = 1  # the ROI's window is staged channels-last once
_BAND = 2  # each bin row's band is staged channels-last
_GATHER = 3  # too large to stage: gathered in place


@njit(cache=True)
def _keys_task(
    task, src, layout, num_images, channels,
    source, hstart, hend, wstart, wend, pooled_h, pooled_w,
    mag_mask, nan_threshold, out, argmax, need_argmax, block, stage_elements,
):  # fmt: skip
    """Task `task` of `pool_keys_serial`: ROI ``task // blocks``, one block of channels."""
    num_blocks = (channels + block - 1) // block
    num_bins = pooled_h * pooled_w
    k = task // num_blocks
    c0 = (task % num_blocks) * block
    nc = min(c0 + block, channels) - c0
    if source[k] < 0:
        for o in range((k * channels + c0) * num_bins, (k * channels + c0 + nc) * num_bins):
            out[o] = 0
            if need_argmax:
                argmax[o] = -1
        return
    level = source[k] // num_images
    b = source[k] - level * num_images
    origin, s_n, s_c = layout[level, OFFSET], layout[level, S_N], layout[level, S_C]
    s_h, s_w, width = layout[level, S_H], layout[level, S_W], layout[level, WIDTH]
    # The running key, raw bits and position of the current bin, per channel.
    rk = np.empty(nc, src.dtype)
    rb = np.empty(nc, src.dtype)
    rh = np.empty(nc, np.int32)
    o_base = (k * channels + c0) * num_bins

    # The ROI's window: the bounding box of its bins (all within [0, H] x [0, W]).
    y0, y1, band_h = hstart[k * pooled_h], hend[k * pooled_h], 0
    for ph in range(pooled_h):
        y0 = min(y0, hstart[k * pooled_h + ph])
        y1 = max(y1, hend[k * pooled_h + ph])
        band_h = max(band_h, hend[k * pooled_h + ph] - hstart[k * pooled_h + ph])
    y1 = max(y1, y0)
    x0, x1 = wstart[k * pooled_w], wend[k * pooled_w]
    for pw in range(pooled_w):
        x0 = min(x0, wstart[k * pooled_w + pw])
        x1 = max(x1, wend[k * pooled_w + pw])
    x1 = max(x1, x0)
    plane0 = origin + b * s_n + c0 * s_c
    if s_c == 1:
        stage, size = _IN_PLACE, 0
    elif (y1 - y0) * (x1 - x0) * nc <= stage_elements:
        stage, size = _WINDOW, (y1 - y0) * (x1 - x0) * nc
    elif band_h * (x1 - x0) * nc <= stage_elements:
        stage, size = _BAND, band_h * (x1 - x0) * nc
    else:
        stage, size = _GATHER, 0
    buf = np.empty(size, src.dtype)
    # Pixel (h, w) of the scanned data has its nc channels at data[base + h*row + w*col:].
    data, base, row, col = src, plane0, s_h, s_w
    if stage != _IN_PLACE and stage != _GATHER:
        data, row, col = buf, (x1 - x0) * nc, nc
    if stage == _WINDOW:
        _stage(src, plane0, s_c, s_h, s_w, nc, y0, y1, x0, x1, buf)
        base = -(y0 * row + x0 * col)

    for ph in range(pooled_h):
        h0 = hstart[k * pooled_h + ph]
        h1 = hend[k * pooled_h + ph]
        if stage == _BAND and h1 > h0:
            _stage(src, plane0, s_c, s_h, s_w, nc, h0, h1, x0, x1, buf)
            base = -(h0 * row + x0 * col)
        for pw in range(pooled_w):
            w0 = wstart[k * pooled_w + pw]
            w1 = wend[k * pooled_w + pw]
            o = o_base + ph * pooled_w + pw
            if h1 <= h0 or w1 <= w0:
                for j in range(nc):
                    out[o + j * num_bins] = 0
                if need_argmax:
                    for j in range(nc):
                        argmax[o + j * num_bins] = -1
                continue
            if stage == _GATHER:
                _scan_strided(data, base, row, col, s_c, h0, h1, w0, w1, nc, width,
                              mag_mask, nan_threshold, need_argmax, rk, rb, rh)  # fmt: skip
            else:
                _scan_contiguous(data, base, row, col, h0, h1, w0, w1, nc, width,
                                 mag_mask, nan_threshold, need_argmax, rk, rb, rh)  # fmt: skip
            for j in range(nc):
                out[o + j * num_bins] = rb[j]
            if need_argmax:
                for j in range(nc):
                    argmax[o + j * num_bins] = rh[j]


@njit(parallel=True, cache=True)
def pool_keys_parallel(
    src, layout, num_images, channels,
    source, hstart, hend, wstart, wend, pooled_h, pooled_w,
    mag_mask, nan_threshold, out, argmax, need_argmax, block, stage_elements,
):  # fmt: skip
    """`pool_keys_serial` over numba's threads (run it in `ops.parallel_region`)."""
    tasks = source.shape[0] * ((channels + block - 1) // block)
    for task in prange(tasks):
        _keys_task(
            task, src, layout, num_images, channels,
            source, hstart, hend, wstart, wend, pooled_h, pooled_w,
            mag_mask, nan_threshold, out, argmax, need_argmax, block, stage_elements,
        )  # fmt: skip


@njit(cache=True)
def pool_keys_serial(
    src, layout, num_images, channels,
    source, hstart, hend, wstart, wend, pooled_h, pooled_w,
    mag_mask, nan_threshold, out, argmax, need_argmax, block, stage_elements,
):  # fmt: skip
    """roi_pool forward over (ROI, channel block) tasks in the calling thread, any strides; each
    ROI is read from the level and image of its source.

    Args:
        src: the memory of every level as a flat signed-integer view (int16/int32/int64;
            `memory.shared_storage`).
        layout: (L, 7) int64 level table (`geometry.LAYOUT_COLUMNS`): element (n, c, h, w) of
            level l is at ``offset + n * s_n + c * s_c + h * s_h + w * s_w`` of `src`.
        num_images, channels: N and C (of every level).
        source, hstart, hend, wstart, wend: from `geometry.roi_geometry` (source
            ``level * N + n``, -1: none; the ROI gives zeros).
        pooled_h, pooled_w: PH, PW.
        mag_mask, nan_threshold: the dtype's magnitude mask and +inf bit pattern (see `_key`).
        out: (K * C * PH * PW,) output, same integer view type as `src`.
        argmax: (K * C * PH * PW,) int32, or anything when `need_argmax` is False.
        need_argmax: whether to compute and write `argmax`.
        block: channels per task.
        stage_elements: when channels are not contiguous (``s_c != 1``, e.g. NCHW), a task
            copies its ROI window (or else each bin row's band) channels-last into a buffer of
            at most this many elements and scans that; larger regions are gathered in place.
    """
    for task in range(source.shape[0] * ((channels + block - 1) // block)):
        _keys_task(
            task, src, layout, num_images, channels,
            source, hstart, hend, wstart, wend, pooled_h, pooled_w,
            mag_mask, nan_threshold, out, argmax, need_argmax, block, stage_elements,
        )  # fmt: skip
