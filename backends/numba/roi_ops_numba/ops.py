"""Glue between torch tensors and the numba kernels: zero-copy views, work split, threads.

Importing this module imports numba (through `roi_ops_numba.kernels`).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numba
import numpy as np
import torch
from roi_ops.backend import RoIPoolProblem

from roi_ops_numba import kernels

# input dtype -> (integer view dtype, magnitude mask, bit pattern of +inf); see kernels._key.
_BITS = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFF_FFFF, 0x7F80_0000),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}

# rois dtype -> geometry dtype G (bfloat16 rois use float32).
_GEOMETRY_MODE = {
    torch.float16: kernels.MODE_HALF,
    torch.bfloat16: kernels.MODE_FLOAT,
    torch.float32: kernels.MODE_FLOAT,
    torch.float64: kernels.MODE_DOUBLE,
}

# Parallel tasks per thread: enough slack for dynamic scheduling to even out ROI sizes.
_TASKS_PER_THREAD = 8
# Channels per task: the inner loop is vectorised over them, so long blocks amortise the per-pixel
# overhead; the floor keeps vectors full when a few ROIs are split over many threads.
_MIN_BLOCK = 16
_MAX_BLOCK = 256
# Output and argmax bytes one task writes, at most (8 per output). Measured on the 16-core Xeon
# (Emerald Rapids) host, mask-14 (196 bins per channel): 256 channels per task 146 ms, 128
# channels 119 ms with 16 threads; 1435 ms and 857 ms with one (a 2-core Zen 5 prefers 256).
_TASK_OUTPUT_BYTES = 256 * 1024
# Inputs whose channels are not contiguous (NCHW): the largest channels-last copy of a ROI's
# window (or bin row's band) a task makes, to stay in L2; larger ones are gathered in place.
_STAGE_BYTES = 512 * 1024

# float32/float64 forward tasks are (group of one image's ROIs, channel block); see `_group_plan`.
# Inputs whose channels are not contiguous are staged a task at a time when the ROIs' windows
# cover at least this many times the area of their images' regions; sparser ROIs are staged per
# ROI by `kernels.pool_forward`.
_STAGE_MIN_COVERAGE = 0.5
_STAGE_TASK_BYTES = 16 * 2**20
_STAGE_MIN_BLOCK = 64
# A thread's staging buffer never exceeds this (fewer channels per block on very large maps;
# the per-ROI kernel when one channel of a region is larger).
_STAGE_MAX_BYTES = 32 * 2**20
# Backward: the planes one task accumulates together (channel block * H * W elements), at most.
_BACKWARD_BLOCK_BYTES = 256 * 1024
# Buffers at least this large are advised into transparent huge pages (Linux): first-touch page
# faults of freshly allocated outputs otherwise cost as much as a kernel.
_HUGE_PAGE_MIN_BYTES = 4 * 2**20
_HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE = 14

_EMPTY_ARGMAX = np.empty(0, dtype=np.int32)


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask Linux to back the whole 2 MiB pages inside [address, address + nbytes) with huge pages.

    Only a hint, for large freshly allocated buffers (fewer, cheaper page faults on first touch);
    a no-op elsewhere, for small buffers, or when the kernel refuses.
    """
    if _madvise is None or nbytes < _HUGE_PAGE_MIN_BYTES:
        return
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)


def _advise_tensor(tensor: torch.Tensor) -> None:
    advise_huge_pages(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def num_threads() -> int:
    """The thread count the kernels run with.

    ``torch.get_num_threads()`` (capped at numba's pool size), unless the environment sets
    ``NUMBA_NUM_THREADS``, in which case numba's own setting (``numba.set_num_threads``) is used.
    """
    if "NUMBA_NUM_THREADS" in os.environ:
        return numba.get_num_threads()
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


@contextmanager
def _parallel_region(threads: int) -> Iterator[None]:
    """Run numba kernels with `threads` threads and dynamic one-task chunks, then restore."""
    previous_threads = numba.get_num_threads()
    numba.set_num_threads(threads)
    previous_chunk = numba.set_parallel_chunksize(1)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(previous_chunk)
        numba.set_num_threads(previous_threads)


def flat_storage(tensor: torch.Tensor, view_dtype: torch.dtype | None = None) -> np.ndarray:
    """A 1-D NumPy view of the storage `tensor` spans, starting at its first element.

    Element ``i`` of `tensor` (multi-index) is at ``sum(i_d * tensor.stride(d))`` in the view.
    No data is copied. `view_dtype` reinterprets the bits (same element size). `tensor` must be
    a non-empty CPU strided tensor.
    """
    span = 1 + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    flat = torch.as_strided(tensor.detach(), (span,), (1,), tensor.storage_offset())
    if view_dtype is not None:
        flat = flat.view(view_dtype)
    return flat.resolve_conj().resolve_neg().numpy()


def _block(channels: int, num_rois: int, threads: int, num_bins: int) -> int:
    """Channels per task: enough (ROI, channel block) tasks for every thread, blocks bounded.

    A task stores each bin's result for all of its channels, PH * PW elements apart; blocks are
    also kept to `_TASK_OUTPUT_BYTES` of output and argmax so those lines stay cached between
    the bins that fill them.
    """
    blocks_wanted = -(-threads * _TASKS_PER_THREAD // max(num_rois, 1))
    block = -(-channels // blocks_wanted)
    cap = max(_MIN_BLOCK, min(_MAX_BLOCK, _TASK_OUTPUT_BYTES // (8 * max(num_bins, 1))))
    block = max(min(block, cap), min(_MIN_BLOCK, channels))
    return -(-channels // -(-channels // block))  # the same task count, evenly sized


def _backward_block(num_images: int, channels: int, plane_bytes: int, threads: int) -> int:
    """Channels per backward task: blocks within `_BACKWARD_BLOCK_BYTES`, enough tasks."""
    cap = max(1, _BACKWARD_BLOCK_BYTES // max(plane_bytes, 1))
    block = max(1, min(cap, num_images * channels // (threads * _TASKS_PER_THREAD)))
    return -(-channels // -(-channels // block))  # the same task count, evenly sized


class BinGeometry(NamedTuple):
    """Every ROI's batch index and bin edges, from `kernels.roi_geometry`.

    batch: (K,) image index, -1 for an invalid ROI. hstart, hend: (K * PH,) rows [start, end)
    of each bin row; wstart, wend: (K * PW,) columns of each bin column; all clamped to the map.
    """

    batch: np.ndarray
    hstart: np.ndarray
    hend: np.ndarray
    wstart: np.ndarray
    wend: np.ndarray
    pooled_h: int
    pooled_w: int


def bin_geometry(problem: RoIPoolProblem) -> BinGeometry:
    """Steps 1-5 of the contract for every ROI of `problem` (see `BinGeometry`)."""
    num_images, _, height, width = problem.input.shape
    pooled_h, pooled_w = problem.pooled_height, problem.pooled_width
    rois = problem.rois.detach().to(torch.float64).contiguous().numpy()
    num_rois = rois.shape[0]
    batch = np.empty(num_rois, dtype=np.int64)
    hstart = np.empty(num_rois * pooled_h, dtype=np.int64)
    hend = np.empty_like(hstart)
    wstart = np.empty(num_rois * pooled_w, dtype=np.int64)
    wend = np.empty_like(wstart)
    kernels.roi_geometry(
        rois, num_images, height, width, pooled_h, pooled_w, float(problem.spatial_scale),
        _GEOMETRY_MODE[problem.rois.dtype], batch, hstart, hend, wstart, wend,
    )  # fmt: skip
    return BinGeometry(batch, hstart, hend, wstart, wend, pooled_h, pooled_w)


def forward(problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None) -> None:
    """Fill `output` (and `argmax`, unless None) for `problem`; see `Backend.forward`."""
    input = problem.input
    channels, width = input.shape[1], input.shape[3]
    if output.numel() == 0:
        return
    if input.numel() == 0:  # N, H or W is 0: every ROI is invalid or every bin empty
        output.zero_()
        if argmax is not None:
            argmax.fill_(-1)
        return

    geometry = bin_geometry(problem)
    _advise_tensor(output)
    if argmax is not None:
        _advise_tensor(argmax)
    threads = num_threads()
    with _parallel_region(threads):
        if input.dtype in (torch.float32, torch.float64):
            _compile_fallback_once(input.dtype)
        if input.dtype in (torch.float32, torch.float64) and _forward_float(
            input, geometry, output, argmax, threads
        ):
            return
        view_dtype, mag_mask, nan_threshold = _BITS[input.dtype]
        s_n, s_c, s_h, s_w = input.stride()
        bins = geometry.pooled_h * geometry.pooled_w
        kernels.pool_forward(
            flat_storage(input, view_dtype), s_n, s_c, s_h, s_w, channels, width, *geometry,
            mag_mask, nan_threshold, output.view(view_dtype).view(-1).numpy(),
            _EMPTY_ARGMAX if argmax is None else argmax.view(-1).numpy(),
            argmax is not None, _block(channels, geometry.batch.shape[0], threads, bins),
            _STAGE_BYTES // input.element_size(),
        )  # fmt: skip


_fallback_compiled: set[torch.dtype] = set()


def _compile_fallback_once(dtype: torch.dtype) -> None:
    """Compile (or load from numba's cache) `kernels.pool_forward` for a float dtype up front.

    Which forward a float call takes depends on how much of the map its ROIs cover, so the
    fallback would otherwise compile in the middle of a run, at the first sparse batch; a 1x1
    call on the first float call of each dtype keeps later calls free of compilation.
    """
    if dtype in _fallback_compiled:
        return
    view_dtype, mag_mask, nan_threshold = _BITS[dtype]
    bits = torch.empty((), dtype=view_dtype).numpy().dtype
    one = np.ones(1, dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    kernels.pool_forward(
        np.zeros(1, dtype=bits), 1, 1, 1, 1, 1, 1, zero, zero, one, zero, one, 1, 1,
        mag_mask, nan_threshold, np.zeros(1, dtype=bits), np.zeros(1, dtype=np.int32), True, 1,
        _STAGE_BYTES // torch.empty((), dtype=dtype).element_size(),
    )  # fmt: skip
    _fallback_compiled.add(dtype)


def _forward_float(
    input: torch.Tensor,
    geometry: BinGeometry,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
    threads: int,
) -> bool:
    """float32/float64 forward by groups of ROIs; False if `pool_forward` should run instead.

    Channels-contiguous inputs are read in place. Other layouts are staged a group's region and
    a block of channels at a time (`kernels.pool_forward_groups`) when the ROIs' windows cover
    their images' regions densely enough (`_STAGE_MIN_COVERAGE`) and a region's channel fits a
    buffer (`_STAGE_MAX_BYTES`); if not, returns False without writing anything.
    """
    channels, width = input.shape[1], input.shape[3]
    s_n, s_c, s_h, s_w = input.stride()
    staged = s_c != 1
    plan = _group_plan(geometry, channels, input.element_size(), threads, staged)
    if plan is None:
        return False
    order, groups, block = plan
    if groups.shape[0]:
        areas = (groups[:, 4] - groups[:, 3]) * (groups[:, 6] - groups[:, 5])
        rows, size = (threads, int(areas.max()) * block) if staged else (1, 0)
        scratch = torch.empty((rows, size), dtype=input.dtype)
        _advise_tensor(scratch)
        kernels.pool_forward_groups(
            flat_storage(input), s_n, s_c, s_h, s_w, channels, width, order, groups,
            *geometry[1:], output.view(-1).numpy(),
            _EMPTY_ARGMAX if argmax is None else argmax.view(-1).numpy(), argmax is not None,
            block, scratch.numpy(),
        )  # fmt: skip
    _fill_invalid(output, argmax, geometry.batch < 0)
    return True


def _windows(
    rois: np.ndarray, geometry: BinGeometry
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(y0, y1, x0, x1) of each of `rois`: the bounding box of its bins (empty when y1 <= y0)."""
    g = geometry
    y0 = g.hstart.reshape(-1, g.pooled_h)[rois].min(axis=1)
    y1 = np.maximum(g.hend.reshape(-1, g.pooled_h)[rois].max(axis=1), y0)
    x0 = g.wstart.reshape(-1, g.pooled_w)[rois].min(axis=1)
    x1 = np.maximum(g.wend.reshape(-1, g.pooled_w)[rois].max(axis=1), x0)
    return y0, y1, x0, x1


def _group_plan(
    geometry: BinGeometry, channels: int, itemsize: int, threads: int, staged: bool
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Groups and channel block for `kernels.pool_forward_groups`; None: stage per ROI instead.

    The valid ROIs of each image, ordered by their window's first row, are cut into consecutive
    groups; a group's region is the bounding box of its ROIs' windows. Tasks (group, channel
    block) are wanted `_TASKS_PER_THREAD` per thread: channel blocks first (they share nothing),
    down to `_STAGE_MIN_BLOCK` channels, whose scan loops are long enough to vectorise well, then
    groups, which each restage their region. A block's region is kept within
    `_STAGE_TASK_BYTES` and its output per ROI within `_TASK_OUTPUT_BYTES` where that minimum
    allows; with fewer ROIs than groups wanted, blocks go down to `_MIN_BLOCK` channels. When
    `staged`, returns None if the windows cover less than `_STAGE_MIN_COVERAGE` times the area
    of their images' regions, or if one channel of a region exceeds `_STAGE_MAX_BYTES`.
    """
    valid = np.flatnonzero(geometry.batch >= 0)
    images = geometry.batch[valid]
    y0, y1, x0, x1 = _windows(valid, geometry)
    sort = np.lexsort((y0, images))
    order, images = valid[sort], images[sort]
    y0, y1, x0, x1 = y0[sort], y1[sort], x0[sort], x1[sort]
    areas = (y1 - y0) * (x1 - x0)
    seen = areas > 0  # ROIs whose bins are all empty read nothing
    cuts = np.flatnonzero(np.diff(images)) + 1
    starts = np.concatenate(([0], cuts)).astype(np.int64) if order.size else cuts
    ends = np.concatenate((cuts, [order.size])).astype(np.int64) if order.size else cuts

    def region(a: int, b: int) -> tuple[int, int, int, int]:
        s = seen[a:b]
        if not s.any():
            return (0, 0, 0, 0)
        return (int(y0[a:b][s].min()), int(y1[a:b][s].max()), int(x0[a:b][s].min()),
                int(x1[a:b][s].max()))  # fmt: skip

    whole = [region(a, b) for a, b in zip(starts, ends, strict=True)]
    largest = max(((r[1] - r[0]) * (r[3] - r[2]) for r in whole), default=0)
    region_bytes = max(largest * itemsize, 1)
    if staged:
        copied = sum((r[1] - r[0]) * (r[3] - r[2]) for r in whole)
        if int(areas.sum()) < _STAGE_MIN_COVERAGE * copied or region_bytes > _STAGE_MAX_BYTES:
            return None
    tasks_wanted = threads * _TASKS_PER_THREAD
    floor = (
        min(_STAGE_MIN_BLOCK, max(_STAGE_MAX_BYTES // region_bytes, 1))
        if staged
        else _STAGE_MIN_BLOCK
    )
    cache_cap = _STAGE_TASK_BYTES // region_bytes
    output_cap = _TASK_OUTPUT_BYTES // (8 * geometry.pooled_h * geometry.pooled_w)
    block = max(-(-channels * len(whole) // tasks_wanted), floor)
    block = min(block, max(min(cache_cap, output_cap), floor), _MAX_BLOCK)
    if order.size * -(-channels // block) < tasks_wanted:  # too few ROIs for enough groups
        block = min(block, max(channels * order.size // tasks_wanted, _MIN_BLOCK))
    block = min(block, channels)
    block = -(-channels // -(-channels // block))  # the same task count, evenly sized
    groups_wanted = -(-tasks_wanted // -(-channels // block))
    rows = []
    for n, a, b in zip(images[starts], starts, ends, strict=True):
        parts = min(b - a, max(1, round(groups_wanted * (b - a) / order.size)))
        edges = np.linspace(a, b, parts + 1).round().astype(np.int64)
        for first, end in zip(edges[:-1], edges[1:], strict=True):
            rows.append((int(n), int(first), int(end), *region(first, end)))
    return order, np.array(rows, dtype=np.int64).reshape(-1, 7), block


def _fill_invalid(output: torch.Tensor, argmax: torch.Tensor | None, invalid: np.ndarray) -> None:
    """Zero the output (argmax -1) of invalid ROIs, whose bins are all empty."""
    if invalid.any():
        rows = torch.from_numpy(np.flatnonzero(invalid))
        output[rows] = 0
        if argmax is not None:
            argmax[rows] = -1


def backward(
    grad_output: torch.Tensor,
    argmax: torch.Tensor,
    batch_index: torch.Tensor,
    input_shape: tuple[int, int, int, int],
    input_dtype: torch.dtype,
) -> torch.Tensor:
    """Deterministic grad_input; see `Backend.backward` for the arguments.

    float16/bfloat16 gradients are accumulated in float32 and rounded once.
    """
    num_images, channels, height, width = input_shape
    acc_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    num_rois = argmax.shape[0]
    if num_images * channels * height * width == 0 or num_rois * channels == 0:
        return torch.zeros(input_shape, dtype=input_dtype)

    grad = grad_output.detach().to(acc_dtype)
    pooled_h, pooled_w = argmax.shape[2], argmax.shape[3]
    if grad.numel() == 0:  # PH or PW is 0 cannot happen, but keep the kernel safe
        return torch.zeros(input_shape, dtype=input_dtype)
    g_k, g_c, g_h, g_w = grad.stride()
    batch = batch_index.detach().to(torch.int64).clamp(0, num_images - 1)
    order = torch.sort(batch, stable=True).indices.numpy()
    counts = torch.bincount(batch, minlength=num_images)
    image_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    result = torch.empty(input_shape, dtype=acc_dtype)
    _advise_tensor(result)
    threads = num_threads()
    plane = height * width
    with _parallel_region(threads):
        kernels.scatter_backward(
            flat_storage(grad), g_k, g_c, g_h, g_w,
            argmax.detach().to(torch.int32).contiguous().view(-1).numpy(),
            order, image_start.numpy(), channels, plane, pooled_h, pooled_w,
            _backward_block(num_images, channels, plane * result.element_size(), threads),
            result.view(-1).numpy(),
        )  # fmt: skip
    return result if acc_dtype == input_dtype else result.to(input_dtype)
