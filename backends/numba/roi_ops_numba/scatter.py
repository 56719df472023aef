"""The deterministic backward in numba: each (level, image, channel block) plane set is owned by
one task, which zeroes it and adds its ROIs' gradients in ROI order. One level is the plain
roi_pool case. Importing this module imports numba."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from roi_ops_numba.lines import lanes_of
from roi_ops_numba.prefetch import prefetch
from roi_ops_numba.staging import widen_summand


@njit(cache=True)
def rois_by_source(rois, levels, num_images, num_levels):
    """ROI indices sorted (stably) by source, ``level * N + batch_index``, and each source's
    start in that order.

    The batch index of row k is ``trunc(rois[k, 0])`` and its level ``levels[k]`` (every row is
    on level 0 when `levels` is empty). Rows whose index is not a finite value in [0, N), or
    whose level is not in [0, L), add nothing (their argmax is all -1) and are left out.

    Returns:
        order: (K',) int64 ROI indices; source_start: (L * N + 1,) int64 offsets into `order`.
    """
    count = rois.shape[0]
    sources = num_levels * num_images
    source = np.empty(count, np.int64)
    source_start = np.zeros(sources + 1, np.int64)
    for k in range(count):
        b = np.float64(rois[k, 0])
        level = np.int64(levels[k]) if levels.shape[0] else np.int64(0)
        valid = math.isfinite(b) and np.trunc(b) >= 0.0 and np.trunc(b) < num_images
        if valid and level >= 0 and level < num_levels:
            source[k] = level * num_images + np.int64(b)
            source_start[source[k] + 1] += 1
        else:
            source[k] = -1
    for s in range(sources):
        source_start[s + 1] += source_start[s]
    order = np.empty(source_start[sources], np.int64)
    fill = source_start[:sources].copy()
    for k in range(count):
        if source[k] >= 0:
            order[fill[source[k]]] = k
            fill[source[k]] += 1
    return order, source_start


def _gradient(grad, index, kind):
    """``grad[index]`` as a float: a float array's element, or the float32 of a 16-bit element's
    raw bits (an int16 array; `kind` says bfloat16 or float16, `staging.widen_summand`)."""


@overload(_gradient)
def _gradient_typed(grad, index, kind):
    if isinstance(grad.dtype, types.Integer):
        return lambda grad, index, kind: widen_summand(grad[index], kind)
    return lambda grad, index, kind: grad[index]


# How many ROIs ahead a prefetching task asks for argmax and gradient lines: far enough for a
# memory access to complete while the ROIs in between are added.
_PREFETCH_AHEAD = 4


@njit(cache=True, inline="always")
def _add_roi(grad, g_base, g_c, g_b, kind, argmax, marks, num_bins, count, plane, out, dst):
    """``out[dst + c * plane + argmax[...]] += grad[...]`` for one ROI's bins of `count`
    channels (c from 0, each offset from the block's first channel): channel by channel, bins
    in row-major order (the order that fixes the sums' bits).
    The offsets are unsigned: no negative-index fix-up per access, and no slice per (ROI,
    channel), whose reference count is an atomic operation each way."""
    for c in range(count):
        m = marks + np.uint64(c * num_bins)
        g = g_base + c * g_c
        d = dst + np.uint64(c * plane)
        for b in range(num_bins):
            a = argmax[m + np.uint64(b)]
            if a >= 0 and a < plane:  # never trust an index with memory
                out[d + np.uint64(a)] += _gradient(grad, np.uint64(g + b * g_b), kind)


@njit(cache=True, inline="always")
def _prefetch_roi(grad, g_base, g_extent, argmax, marks, span):
    """Prefetch the `span` argmax elements from `marks` and, when they are dense, the
    `g_extent` gradient elements from `g_base` (every line of each run)."""
    for e in range(0, span + 15, 16):  # 16 int32 to a 64-byte line
        prefetch(argmax, marks + np.uint64(min(e, span - 1)))
    if g_extent <= 2 * span:
        step = lanes_of(grad)
        for e in range(0, g_extent + step - 1, step):
            prefetch(grad, np.uint64(g_base + min(e, g_extent - 1)))


@njit(cache=True)
def _scatter_task(
    task, grad, g_k, g_c, g_b, kind, argmax, order, source_start, num_images, channels, table,
    num_bins, prefetch_span, out,
):  # fmt: skip
    """Task `task` of `scatter_serial`: one level's image and one block of its channels."""
    level = 0
    while level + 1 < table.shape[0] and task >= table[level + 1, 3]:
        level += 1
    plane, base, block, first = table[level, 0], table[level, 1], table[level, 2], table[level, 3]
    num_blocks = (channels + block - 1) // block
    n = (task - first) // num_blocks
    c0 = ((task - first) % num_blocks) * block
    c1 = min(c0 + block, channels)
    # The zeroing through a slice becomes a memset.
    out[base + (n * channels + c0) * plane : base + (n * channels + c1) * plane] = 0
    dst = np.uint64(base + (n * channels + c0) * plane)
    s = level * num_images + n
    begin, end = source_start[s], source_start[s + 1]
    span = (c1 - c0) * num_bins
    if span > prefetch_span or span == 0:
        for j in range(begin, end):
            k = order[j]
            marks = np.uint64((k * channels + c0) * num_bins)
            _add_roi(grad, k * g_k + c0 * g_c, g_c, g_b, kind, argmax, marks, num_bins, c1 - c0,
                     plane, out, dst)  # fmt: skip
        return
    # A short run from each ROI's row of argmax (C * PH * PW apart): the hardware prefetchers
    # do not follow it, so the task asks for the ROIs ahead itself.
    g_extent = (c1 - c0 - 1) * g_c + (num_bins - 1) * g_b + 1
    for j in range(begin, end):
        if j + _PREFETCH_AHEAD < end:
            ahead = order[j + _PREFETCH_AHEAD]
            _prefetch_roi(grad, ahead * g_k + c0 * g_c, g_extent, argmax,
                          np.uint64((ahead * channels + c0) * num_bins), span)  # fmt: skip
        k = order[j]
        marks = np.uint64((k * channels + c0) * num_bins)
        _add_roi(grad, k * g_k + c0 * g_c, g_c, g_b, kind, argmax, marks, num_bins, c1 - c0,
                 plane, out, dst)  # fmt: skip


@njit(cache=True)
def scatter_serial(
    grad, g_k, g_c, g_b, kind, argmax, rois, levels, num_images, channels, table, tasks, num_bins,
    prefetch_span, out,
):  # fmt: skip
    """grad_input_l[n, c].flat[argmax] += grad_output for the ROIs of each level l, one
    (level, image, channel block) per task.

    Each plane is owned by one task, which zeroes it and adds its ROIs' gradients in increasing
    ROI order (and bins in row-major order), so the result is run-to-run identical and does not
    depend on the thread count or on the blocks.

    Args:
        grad: grad_output's storage as a flat float32/float64 array, or as int16 raw bits of
            bfloat16/float16; element (k, c, bin) is at ``k * g_k + c * g_c + bin * g_b`` (bins
            in row-major order; zero strides allowed).
        kind: 0 for float grads, else `staging.BFLOAT16` or `staging.FLOAT16` (each 16-bit
            element is widened exactly to float32 as it is read).
        argmax: (K * C * PH * PW,) int32 from the forward (into the plane of the ROI's level);
            -1 gets no gradient.
        rois: (K, 5) float32/float64, the forward's rows (their batch indices are read).
        levels: (K,) int64 level of each ROI (outside [0, L): none), or empty: all on level 0.
        num_images, channels: N and C.
        table: (L, 4) int64 rows (plane, offset, block, first) of each level: H * W; the start
            of its (N, C, H, W) contiguous gradient in `out`; its channels per task (their
            planes are accumulated together, so keep ``block * plane`` within the cache); its
            first task (level l has ``N * ceil(C / block)`` tasks, numbered on from ``first``).
        tasks: the task count of all levels.
        num_bins: PH * PW.
        prefetch_span: a task whose block of one ROI's argmax has at most this many elements
            prefetches the ROIs ahead of the one it adds.
        out: float32/float64 memory of every level's accumulator (`memory.shared_storage`;
            float32 for 16-bit grads), fully overwritten.
    """
    order, source_start = rois_by_source(rois, levels, num_images, table.shape[0])
    for task in range(tasks):
        _scatter_task(task, grad, g_k, g_c, g_b, kind, argmax, order, source_start, num_images,
                      channels, table, num_bins, prefetch_span, out)  # fmt: skip


@njit(parallel=True, cache=True)
def scatter_parallel(
    grad, g_k, g_c, g_b, kind, argmax, rois, levels, num_images, channels, table, tasks, num_bins,
    prefetch_span, out,
):  # fmt: skip
    """`scatter_serial` over numba's threads (run it in `ops.parallel_region`)."""
    order, source_start = rois_by_source(rois, levels, num_images, table.shape[0])
    for task in prange(tasks):
        _scatter_task(task, grad, g_k, g_c, g_b, kind, argmax, order, source_start, num_images,
                      channels, table, num_bins, prefetch_span, out)  # fmt: skip
