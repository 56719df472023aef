"""The float32/float64 forward: groups of one image's ROIs, channels-last, floats compared directly.

`plan_groups` sorts the valid ROIs of each image by their window's first row and cuts them into
groups; a task is one group and a block of channels. Inputs whose channels are contiguous
(channels_last) are read in place; other layouts have the group's region (the bounding box of
its ROIs' windows) of those channels copied channels-last into a per-thread buffer that stays in
cache (the input itself is never copied). Floats are compared directly: an element replaces the
running maximum if it is greater, or if it is NaN and the maximum is not, so the first NaN wins
and -0.0 == +0.0 keeps the first one. The output is the winning element itself.

Importing this module imports numba.
"""

from __future__ import annotations

import math

import numpy as np
from numba import get_thread_id, njit, prange

from roi_ops_numba.geometry import (
    OFFSET,
    S_C,
    S_H,
    S_N,
    S_W,
    WIDTH,
    roi_windows,
)
from roi_ops_numba.lines import (
    choose,
    int32_line,
    lanes_of,
    load_line,
    replaces_maximum,
    store_line,
)
from roi_ops_numba.staging import _stage, narrow_region, widen_region
from roi_ops_numba.streaming import store_fence, stream_gathered, stream_halves_gathered


@njit(cache=True, inline="always")
def _scan_bin(data, org, row, pix, h0, h1, w0, w1, width, track, tile, tile_pos, t, nl):
    """Reduce one non-empty bin for `nl` channels into tile[t : t + nl] (and tile_pos[t : t +
    nl] when `track`).

    Pixel (h, w) has its channels at data[org + h*row + w*pix:][:nl]. Four lines of channels at
    a time (`lines`): their running maxima and positions stay in registers over the bin's
    pixels, and the four are independent, so each pixel's compare-and-select chains overlap.
    The first pixel starts the maxima; the scan goes on from the second.
    """
    lanes = lanes_of(data)
    for c in range(0, nl, 4 * lanes):
        n0 = min(lanes, nl - c)
        n1 = max(min(lanes, nl - c - lanes), 0)
        n2 = max(min(lanes, nl - c - 2 * lanes), 0)
        n3 = max(min(lanes, nl - c - 3 * lanes), 0)
        p = org + h0 * row + w0 * pix + c
        b0 = load_line(data, p, n0)
        b1 = load_line(data, p + lanes, n1)
        b2 = load_line(data, p + 2 * lanes, n2)
        b3 = load_line(data, p + 3 * lanes, n3)
        q0 = int32_line(h0 * width + w0, b0)
        q1, q2, q3 = q0, q0, q0
        for h in range(h0, h1):
            for w in range(w0 + 1 if h == h0 else w0, w1):
                p = org + h * row + w * pix + c
                x0 = load_line(data, p, n0)
                x1 = load_line(data, p + lanes, n1)
                x2 = load_line(data, p + 2 * lanes, n2)
                x3 = load_line(data, p + 3 * lanes, n3)
                g0 = replaces_maximum(x0, b0)
                g1 = replaces_maximum(x1, b1)
                g2 = replaces_maximum(x2, b2)
                g3 = replaces_maximum(x3, b3)
                b0 = choose(g0, x0, b0)
                b1 = choose(g1, x1, b1)
                b2 = choose(g2, x2, b2)
                b3 = choose(g3, x3, b3)
                if track:
                    hw = int32_line(h * width + w, b0)
                    q0 = choose(g0, hw, q0)
                    q1 = choose(g1, hw, q1)
                    q2 = choose(g2, hw, q2)
                    q3 = choose(g3, hw, q3)
        store_line(tile, t + c, n0, b0)
        store_line(tile, t + c + lanes, n1, b1)
        store_line(tile, t + c + 2 * lanes, n2, b2)
        store_line(tile, t + c + 3 * lanes, n3, b3)
        if track:
            store_line(tile_pos, t + c, n0, q0)
            store_line(tile_pos, t + c + lanes, n1, q1)
            store_line(tile_pos, t + c + 2 * lanes, n2, q2)
            store_line(tile_pos, t + c + 3 * lanes, n3, q3)


# Compiled without numba's reference counting (`_nrt=False`: it allocates nothing, and every
# array it sees is owned by its caller): inlined into the task with counting on, each array it
# takes or slices was counted up and down around every ROI, atomic operations that on x86 also
# wait until the streamed stores before them have left the core (numba README, "Reference
# counts around each ROI").
@njit(cache=True, _nrt=False)
def _pool_roi(data, org, row, pix, width, k, o_base, nl, hstart, hend, wstart, wend,
              pooled_h, pooled_w, out, argmax, need_argmax, tile, tile_pos, stream, out_bits,
              kind, tile16, transpose):  # fmt: skip
    """Pool every bin of ROI `k` for `nl` channels read from a channels-last view.

    Pixel (h, w) has its channels at ``data[org + h*row + w*pix:][:nl]``. Channel j of bin b goes
    to ``out[o_base + j * PH * PW + b]`` (and `argmax`). The results go bin-major (each bin's
    channels contiguous, as the scan leaves them) into `tile` (``PH * PW * nl`` elements; and
    `tile_pos` with the argmax, else ``nl``), then are transposed into the output's
    channel-major order, output ``j * PH * PW + b`` from tile element ``transpose[j * PH * PW +
    b] = b * nl + j``: the outputs written in order instead of nl stores PH * PW elements apart
    per bin (faster with and without the argmax; the README has the measurements). With
    `stream` they are written by non-temporal stores (`streaming`; the caller fences). With a
    16-bit `kind` the results are narrowed back to their raw bits into `out_bits` instead of
    `out`: with `stream` narrowed and streamed 16 at a time, else plainly (through `tile16`, as
    many int16 elements as `tile`).
    """
    num_bins = pooled_h * pooled_w
    for ph in range(pooled_h):
        h0 = hstart[k * pooled_h + ph]
        h1 = hend[k * pooled_h + ph]
        for pw in range(pooled_w):
            w0 = wstart[k * pooled_w + pw]
            w1 = wend[k * pooled_w + pw]
            t = (ph * pooled_w + pw) * nl
            if h1 <= h0 or w1 <= w0:
                tile[t : t + nl] = 0
                if need_argmax:
                    tile_pos[t : t + nl] = -1
            else:
                _scan_bin(data, org, row, pix, h0, h1, w0, w1, width, need_argmax, tile, tile_pos,
                          t, nl)  # fmt: skip
    # Through slices of this ROI's outputs, indexed from 0: a signed offset from o_base would
    # take numba's negative-index fix-up on every store (README: many-small). Output o is tile
    # element transpose[o]: one loop over the outputs, which LLVM vectorises with gathers.
    size = nl * num_bins
    positions = argmax[o_base : o_base + size] if need_argmax else argmax[:0]
    if kind != 0 and stream:
        # 16 results at a time: their float32 patterns gathered, narrowed in 32-bit vector
        # lanes and streamed (a loop of 16-bit stores of gathered elements stays scalar, and
        # the scalar narrowing's int64 arithmetic fills half as many lanes).
        stream_halves_gathered(
            out_bits[o_base : o_base + size], tile.view(np.int32), transpose, kind
        )
    elif kind != 0:
        # Narrowed in tile order first (a contiguous loop, which vectorises), then transposed.
        narrowed = tile16[:size]
        narrow_region(tile.view(np.int32), narrowed, kind)
        narrow = out_bits[o_base : o_base + size]
        for o in range(size):
            narrow[o] = narrowed[transpose[o]]
    elif stream:
        stream_gathered(out[o_base : o_base + size], tile, transpose)
    else:
        values = out[o_base : o_base + size]
        for o in range(size):
            values[o] = tile[transpose[o]]
    if not need_argmax:
        return
    if stream:
        stream_gathered(positions, tile_pos, transpose)
    else:
        for o in range(size):
            positions[o] = tile_pos[transpose[o]]


@njit(cache=True)
def _groups_task(
    task, src, layout, num_images, channels, order, groups,
    hstart, hend, wstart, wend, pooled_h, pooled_w, out, argmax, need_argmax, block, buffer,
    stream, bits, out_bits, kind,
):  # fmt: skip
    """Task `task` of `pool_groups_serial`: group ``task // blocks``, one block of channels,
    staged (when the channels are not contiguous, or widened from 16 bits) in `buffer`, the
    running thread's own; with `stream`, its outputs written by non-temporal stores and fenced
    before it returns."""
    num_blocks = (channels + block - 1) // block
    num_bins = pooled_h * pooled_w
    g = task // num_blocks
    c0 = (task % num_blocks) * block
    nl = min(c0 + block, channels) - c0
    level = groups[g, 0] // num_images
    n = groups[g, 0] - level * num_images
    first, end = groups[g, 1], groups[g, 2]
    y0, y1, x0, x1 = groups[g, 3], groups[g, 4], groups[g, 5], groups[g, 6]
    origin, s_n, s_c = layout[level, OFFSET], layout[level, S_N], layout[level, S_C]
    s_h, s_w, width = layout[level, S_H], layout[level, S_W], layout[level, WIDTH]
    tile = np.empty(num_bins * nl, buffer.dtype)
    tile_pos = np.empty((num_bins if need_argmax else 1) * nl, np.int32)
    tile16 = np.empty(num_bins * nl if kind != 0 else 1, np.int16)
    transpose = np.empty(num_bins * nl, np.int32)
    for j in range(nl):
        for b in range(num_bins):
            transpose[j * num_bins + b] = b * nl + j
    if kind != 0:
        region_w = x1 - x0
        data = buffer[: (y1 - y0) * region_w * nl]
        # The raw bits staged as they are, then widened in one contiguous pass.
        raw = np.empty(data.shape[0], np.int16)
        _stage(bits, origin + n * s_n + c0 * s_c, s_c, s_h, s_w, nl, y0, y1, x0, x1, raw)
        widen_region(raw, data.view(np.int32), kind)
        org, row, pix = -(y0 * region_w + x0) * nl, region_w * nl, nl
    elif s_c == 1:
        data, org, row, pix = src, origin + n * s_n + c0, s_h, s_w
    else:
        region_w = x1 - x0
        data = buffer[: (y1 - y0) * region_w * nl]
        _stage(src, origin + n * s_n + c0 * s_c, s_c, s_h, s_w, nl, y0, y1, x0, x1, data)
        # Pixel (h, w) of the region starts at ((h - y0) * region_w + (w - x0)) * nl.
        org, row, pix = -(y0 * region_w + x0) * nl, region_w * nl, nl
    for i in range(first, end):
        k = order[i]
        _pool_roi(data, org, row, pix, width, k, (k * channels + c0) * num_bins, nl,
                  hstart, hend, wstart, wend, pooled_h, pooled_w, out, argmax, need_argmax,
                  tile, tile_pos, stream, out_bits, kind, tile16, transpose)  # fmt: skip
    if stream:
        store_fence()


@njit(cache=True)
def _zero_invalid(source, per_roi, out, argmax, need_argmax, out_bits, kind):
    """Zeros (argmax -1) for every ROI whose source is -1 (invalid or no level), in `out`, or
    in `out_bits` for a 16-bit `kind`."""
    for k in range(source.shape[0]):
        if source[k] < 0:
            if kind != 0:
                out_bits[k * per_roi : (k + 1) * per_roi] = 0
            else:
                out[k * per_roi : (k + 1) * per_roi] = 0
            if need_argmax:
                for o in range(k * per_roi, (k + 1) * per_roi):
                    argmax[o] = -1


@njit(parallel=True, cache=True)
def pool_groups_parallel(
    src, layout, num_images, channels, source, order, groups,
    hstart, hend, wstart, wend, pooled_h, pooled_w, out, argmax, need_argmax, block, scratch,
    stream, bits, out_bits, kind,
):  # fmt: skip
    """`pool_groups_serial` over numba's threads (run it in `ops.parallel_region`)."""
    _zero_invalid(source, channels * pooled_h * pooled_w, out, argmax, need_argmax, out_bits, kind)
    tasks = groups.shape[0] * ((channels + block - 1) // block)
    for task in prange(tasks):
        _groups_task(
            task, src, layout, num_images, channels, order, groups,
            hstart, hend, wstart, wend, pooled_h, pooled_w, out, argmax, need_argmax, block,
            scratch[get_thread_id()], stream, bits, out_bits, kind,
        )  # fmt: skip


@njit(cache=True)
def pool_groups_serial(
    src, layout, num_images, channels, source, order, groups,
    hstart, hend, wstart, wend, pooled_h, pooled_w, out, argmax, need_argmax, block, scratch,
    stream, bits, out_bits, kind,
):  # fmt: skip
    """roi_pool forward of groups of ROIs of one image (of one level) each, in the calling
    thread.

    A task is one group and a block of channels. When the level's channels are contiguous
    (channels_last) it reads them in place; otherwise it first copies the group's region of its
    channels channels-last into its thread's row of `scratch`, then pools each of the group's
    ROIs from there with `_pool_roi`. Either way a task's reads stay within one image's block of
    channels, which stays in cache while the group's ROIs, which overlap, re-read it. ROIs
    without a source (invalid, or without a level) get zeros and argmax -1.

    Args:
        src: float32/float64 memory of every level (`memory.shared_storage`).
        layout: (L, 7) int64 level table (`geometry.LAYOUT_COLUMNS`): element (n, c, h, w) of
            level l is at ``offset + n * s_n + c * s_c + h * s_h + w * s_w`` of `src`.
        num_images, channels: N and C (of every level).
        source: (K,) from `geometry.roi_geometry` (``level * N + n``, -1: none).
        order, groups: from `plan_groups`.
        hstart, hend, wstart, wend, pooled_h, pooled_w: the geometry.
        out: (K * C * PH * PW,) output, same dtype as `src`.
        argmax: (K * C * PH * PW,) int32, or anything when `need_argmax` is False.
        need_argmax: whether to compute and write `argmax`.
        block: channels per task.
        scratch: (threads, S) buffer, S at least the largest region times `block`, when the
            channels are not contiguous (the serial kernel uses row 0, the parallel one row
            ``numba.get_thread_id()``); else unused.
        stream: write `out` (or `out_bits`) and `argmax` with non-temporal stores
            (`streaming`), for outputs much larger than the caches; each task fences its stores
            before it returns.
        bits, out_bits, kind: for float16 (`staging.FLOAT16`) and bfloat16
            (`staging.BFLOAT16`) maps: the maps' raw bits (int16 memory addressed as `src`
            would be; `src` and `out` are then unused), the output's raw bits (int16, as
            `out`), and the format. Every region is staged widened to float32 (`scratch` is
            float32), scanned as float32, and each result narrowed back to its element's bits.
            `kind` 0: float32/float64 `src` and `out`; `bits` and `out_bits` unused.
    """
    _zero_invalid(source, channels * pooled_h * pooled_w, out, argmax, need_argmax, out_bits, kind)
    for task in range(groups.shape[0] * ((channels + block - 1) // block)):
        _groups_task(
            task, src, layout, num_images, channels, order, groups,
            hstart, hend, wstart, wend, pooled_h, pooled_w, out, argmax, need_argmax, block,
            scratch[0], stream, bits, out_bits, kind,
        )  # fmt: skip


@njit(cache=True)
def _sort_by_image_and_row(images, rows, height):
    """The stable order of the (image, first window row) pairs (rows in [0, H]): a counting
    sort, linear in the ROIs and the N * (H + 1) keys."""
    count = images.shape[0]
    if count == 0:
        return np.empty(0, np.int64)
    keys = images * (height + 1) + rows
    starts = np.zeros(keys.max() + 2, np.int64)
    for i in range(count):
        starts[keys[i] + 1] += 1
    for key in range(1, starts.shape[0]):
        starts[key] += starts[key - 1]
    order = np.empty(count, np.int64)
    for i in range(count):
        order[starts[keys[i]]] = i
        starts[keys[i]] += 1
    return order


@njit(cache=True)
def _region_and_cover(y0, y1, x0, x1, a, b):
    """(r0, r1, c0, c1, covered, widest) of windows a..b-1: the bounding box of those that are
    not empty ((0, 0, 0, 0) if none is), the sum of their areas and the largest area."""
    r0, r1, c0, c1 = np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    covered, widest = np.int64(0), np.int64(0)
    found = False
    for i in range(a, b):
        area = (y1[i] - y0[i]) * (x1[i] - x0[i])
        covered += area
        widest = max(widest, area)
        if y1[i] > y0[i] and x1[i] > x0[i]:
            if not found:
                r0, r1, c0, c1 = y0[i], y1[i], x0[i], x1[i]
                found = True
            else:
                r0, r1 = min(r0, y0[i]), max(r1, y1[i])
                c0, c1 = min(c0, x0[i]), max(c1, x1[i])
    return r0, r1, c0, c1, covered, widest


@njit(cache=True)
def plan_groups(
    source, hstart, hend, wstart, wend, pooled_h, pooled_w, height, channels, itemsize,
    threads, staged, tasks_per_thread, min_block, max_block, task_output_bytes,
    stage_min_coverage, stage_min_block, stage_task_bytes, stage_max_bytes,
):  # fmt: skip
    """Groups and channel block for `pool_groups_*`, or block 0: use `pool_keys` instead.

    An *image* here is one source of `source` (one image of one level; `height` is the largest H of
    the levels). The ROIs of each image (those with a source) are ordered by their window's first
    row. When `staged`, an image whose ROIs' windows cover at least `stage_min_coverage` times the
    area of their bounding box is one *segment* (its region is staged once per task and re-read from
    cache by every ROI); an image whose ROIs are sparser makes one segment per ROI (each ROI stages
    only its own window). Without staging every image is one segment. Tasks (group, channel block)
    are wanted `tasks_per_thread` per thread: channel blocks first (they share nothing), down to
    `stage_min_block` channels, whose scan loops are long enough to vectorise well, then segments
    are cut into consecutive groups, which each restage their region. A block's region is kept
    within `stage_task_bytes` and its output per ROI within `task_output_bytes` where that minimum
    allows; with fewer ROIs than groups wanted, blocks go down to `min_block` channels. When
    `staged`, gives block 0 if one channel of a region exceeds `stage_max_bytes`.

    Returns:
        (order, groups, block, scratch): the ROI indices grouped; (G, 7) int64 rows (source,
        first, end, y0, y1, x0, x1), the group owning ``order[first:end]`` and its region rows
        y0..y1-1, columns x0..x1-1; channels per task (0: use `pool_keys`); and the elements of
        staging buffer each thread needs (0 when not `staged`).
    """
    valid = np.flatnonzero(source >= 0)
    y0, y1, x0, x1 = roi_windows(hstart, hend, wstart, wend, pooled_h, pooled_w, valid)
    sort = _sort_by_image_and_row(source[valid], y0, height)
    order = valid[sort]
    y0, y1, x0, x1 = y0[sort], y1[sort], x0[sort], x1[sort]
    images = source[order]
    count = order.shape[0]
    empty = np.zeros((0, 7), np.int64)
    if count == 0:
        return order, empty, channels, 0
    # Segments [starts[s], starts[s + 1]) of `order`: whole images, or single sparse ROIs;
    # `largest`: the largest region of a segment.
    starts = [0]
    dense = [True]
    largest = 0
    a = 0
    for i in range(1, count + 1):
        if i < count and images[i] == images[a]:
            continue
        r0, r1, c0, c1, covered, widest = _region_and_cover(y0, y1, x0, x1, a, i)
        if staged and covered < stage_min_coverage * (r1 - r0) * (c1 - c0):
            dense[-1] = False
            for j in range(a + 1, i):
                starts.append(j)
                dense.append(False)
            largest = max(largest, widest)
        else:
            largest = max(largest, (r1 - r0) * (c1 - c0))
        starts.append(i)
        dense.append(True)
        a = i
    segments = len(starts) - 1
    region_bytes = max(largest * itemsize, 1)
    if staged and region_bytes > stage_max_bytes:
        return order, empty, 0, 0
    tasks_wanted = threads * tasks_per_thread
    floor = stage_min_block
    if staged:
        floor = min(stage_min_block, max(stage_max_bytes // region_bytes, 1))
    cache_cap = stage_task_bytes // region_bytes
    output_cap = task_output_bytes // (8 * pooled_h * pooled_w)
    block = max(-(-channels * segments // tasks_wanted), floor)
    block = min(block, max(min(cache_cap, output_cap), floor), max_block)
    if count * -(-channels // block) < tasks_wanted:  # too few ROIs for enough groups
        block = min(block, max(channels * count // tasks_wanted, min_block))
    block = max(min(block, channels), 1)
    block = -(-channels // -(-channels // block))  # the same task count, evenly sized
    groups_wanted = -(-tasks_wanted // -(-channels // block))
    rows = []
    for s in range(segments):
        a, b = starts[s], starts[s + 1]
        parts = 1
        if dense[s]:
            parts = min(b - a, max(1, int(math.floor(groups_wanted * (b - a) / count + 0.5))))
        for p in range(parts):
            first = a + int(math.floor(p * (b - a) / parts + 0.5))
            end = a + int(math.floor((p + 1) * (b - a) / parts + 0.5))
            if end > first:
                r0, r1, c0, c1, _, _ = _region_and_cover(y0, y1, x0, x1, first, end)
                rows.append((images[a], np.int64(first), np.int64(end), r0, r1, c0, c1))
    groups = np.empty((len(rows), 7), np.int64)
    scratch = 0
    for g in range(len(rows)):
        row = rows[g]
        groups[g, 0], groups[g, 1], groups[g, 2] = row[0], row[1], row[2]
        groups[g, 3], groups[g, 4], groups[g, 5], groups[g, 6] = row[3], row[4], row[5], row[6]
        scratch = max(scratch, (row[4] - row[3]) * (row[6] - row[5]) * block)
    return order, groups, block, scratch if staged else 0
