"""The deterministic backward in numba: each (image, channel block) plane set is owned by one
task, which zeroes it and adds its ROIs' gradients in ROI order. Importing this module imports
numba."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True)
def rois_by_image(rois, num_images):
    """ROI indices sorted (stably) by batch index, and each image's start in that order.

    The batch index of row k is ``trunc(rois[k, 0])``; rows whose index is not a finite value in
    [0, N) are invalid (argmax all -1: they add nothing) and are left out.

    Returns:
        order: (K',) int64 ROI indices; image_start: (N + 1,) int64 offsets into `order`.
    """
    count = rois.shape[0]
    batch = np.empty(count, np.int64)
    image_start = np.zeros(num_images + 1, np.int64)
    for k in range(count):
        b = np.float64(rois[k, 0])
        if math.isfinite(b) and np.trunc(b) >= 0.0 and np.trunc(b) < num_images:
            batch[k] = np.int64(b)
            image_start[batch[k] + 1] += 1
        else:
            batch[k] = -1
    for n in range(num_images):
        image_start[n + 1] += image_start[n]
    order = np.empty(image_start[num_images], np.int64)
    fill = image_start[:num_images].copy()
    for k in range(count):
        if batch[k] >= 0:
            order[fill[batch[k]]] = k
            fill[batch[k]] += 1
    return order, image_start


@njit(cache=True)
def _scatter_task(
    task, grad, g_k, g_c, g_h, g_w, argmax, order, image_start,
    channels, plane, pooled_h, pooled_w, block, out,
):  # fmt: skip
    """Task `task` of `scatter_serial`: image ``task // blocks``, one block of channels."""
    num_bins = pooled_h * pooled_w
    num_blocks = (channels + block - 1) // block
    n = task // num_blocks
    c0 = (task % num_blocks) * block
    c1 = min(c0 + block, channels)
    # Slices, indexed from 0 inside: numba then needs no negative-index fix-up per access, and
    # the zeroing becomes a memset.
    out[(n * channels + c0) * plane : (n * channels + c1) * plane] = 0
    for j in range(image_start[n], image_start[n + 1]):
        k = order[j]
        for c in range(c0, c1):
            a_base = (k * channels + c) * num_bins
            marks = argmax[a_base : a_base + num_bins]
            g_base = k * g_k + c * g_c
            dst = out[(n * channels + c) * plane : (n * channels + c + 1) * plane]
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    a = marks[ph * pooled_w + pw]
                    if a >= 0 and a < plane:  # never trust an index with memory
                        dst[a] += grad[g_base + ph * g_h + pw * g_w]


@njit(cache=True)
def scatter_serial(
    grad, g_k, g_c, g_h, g_w, argmax, rois, num_images,
    channels, plane, pooled_h, pooled_w, block, out,
):  # fmt: skip
    """grad_input[n, c].flat[argmax] += grad_output, one (image, channel block) per task.

    Each plane is owned by one task, which zeroes it and adds its ROIs' gradients in increasing
    ROI order (and bins in row-major order), so the result is run-to-run identical and does not
    depend on the thread count or on `block`.

    Args:
        grad: grad_output's storage as a flat float32/float64 array; element (k, c, ph, pw) is at
            ``k * g_k + c * g_c + ph * g_h + pw * g_w`` (zero strides allowed).
        argmax: (K * C * PH * PW,) int32 from the forward; -1 gets no gradient.
        rois: (K, 5) float32/float64, the forward's rows (their batch indices are read).
        num_images: N.
        channels, plane: C and H * W.
        pooled_h, pooled_w: PH, PW.
        block: channels per task (their planes are accumulated together, so keep
            ``block * plane`` within the cache).
        out: (N * C * H * W,) float32/float64 accumulator, fully overwritten.
    """
    order, image_start = rois_by_image(rois, num_images)
    for task in range(num_images * ((channels + block - 1) // block)):
        _scatter_task(task, grad, g_k, g_c, g_h, g_w, argmax, order, image_start,
                      channels, plane, pooled_h, pooled_w, block, out)  # fmt: skip


@njit(parallel=True, cache=True)
def scatter_parallel(
    grad, g_k, g_c, g_h, g_w, argmax, rois, num_images,
    channels, plane, pooled_h, pooled_w, block, out,
):  # fmt: skip
    """`scatter_serial` over numba's threads (run it in `ops.parallel_region`)."""
    order, image_start = rois_by_image(rois, num_images)
    tasks = num_images * ((channels + block - 1) // block)
    for task in prange(tasks):
        _scatter_task(task, grad, g_k, g_c, g_h, g_w, argmax, order, image_start,
                      channels, plane, pooled_h, pooled_w, block, out)  # fmt: skip
