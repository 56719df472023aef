"""Glue between torch tensors and the numba kernels: views, the serial/parallel choice, threads.

Every call computes the ROI geometry in one compiled pass (which also records bad ROIs and
estimates the work), then runs a serial kernel in the calling thread when the work is below
``tuning.serial_work``, or the parallel one otherwise. A multi-level (FPN) call is the same
pass over every level's ROIs: the kernels address all levels through one base array
(`memory.shared_storage`) and a per-level layout, and a one-map call is its one-level case.
Importing this module imports numba.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
import torch
from roi_ops import host_memory
from roi_ops.backend import (
    MultiScaleRoIPoolBackwardProblem,
    MultiScaleRoIPoolProblem,
    RoIPoolBackwardProblem,
    RoIPoolProblem,
    accumulate_dtype,
)
from roi_ops.bad_rois import SLOTS

from roi_ops_numba import geometry, pool_groups, pool_keys, scatter, staging
from roi_ops_numba.memory import advise_tensor, flat_storage, level_offsets, shared_storage
from roi_ops_numba.tuning import NumbaTuning

# input dtype -> (integer view dtype, magnitude mask, bit pattern of +inf); see pool_keys._key.
_BITS = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFF_FFFF, 0x7F80_0000),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}

# rois dtype -> geometry dtype G (bfloat16 rois use float32).
_GEOMETRY_MODE = {
    torch.float16: geometry.MODE_HALF,
    torch.bfloat16: geometry.MODE_FLOAT,
    torch.float32: geometry.MODE_FLOAT,
    torch.float64: geometry.MODE_DOUBLE,
}
_FLOATS = (torch.float32, torch.float64)
# 16-bit maps the grouped kernels stage widened to float32 (`staging.widen_bits`).
_WIDENED = {torch.bfloat16: staging.BFLOAT16, torch.float16: staging.FLOAT16}
_NO_BITS = np.empty(0, dtype=np.int16)
_NO_FLOATS = np.empty(0, dtype=np.float32)

_EMPTY_ARGMAX = np.empty(0, dtype=np.int32)
_NO_LOG = np.empty(SLOTS, dtype=np.int64)
_ONE_LEVEL = np.empty(0, dtype=np.int64)  # `levels` of a one-map call: every ROI on level 0

# numba sizes its pool from NUMBA_NUM_THREADS when it is imported; read once, like numba does.
_THREADS_FROM_ENVIRONMENT = "NUMBA_NUM_THREADS" in os.environ


def num_threads() -> int:
    """The thread count a parallel kernel runs with.

    ``torch.get_num_threads()`` (capped at numba's pool size), unless the environment set
    ``NUMBA_NUM_THREADS`` when this module was imported: then numba's own setting
    (``numba.set_num_threads`` in the calling thread, else the pool size).
    """
    if _THREADS_FROM_ENVIRONMENT:
        return numba.get_num_threads()
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


@contextmanager
def parallel_region(threads: int) -> Iterator[None]:
    """Run parallel kernels on `threads` threads with dynamic one-task chunks, then restore
    the calling thread's settings (numba keeps both per Python thread)."""
    previous_threads = numba.get_num_threads()
    numba.set_num_threads(threads)
    previous_chunk = numba.set_parallel_chunksize(1)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(previous_chunk)
        numba.set_num_threads(previous_threads)


def run_kernel(serial: Callable, parallel: Callable, threads: int, arguments: tuple) -> Any:
    """Call `serial` in the calling thread when `threads` is 1, else `parallel` on `threads`
    threads (`parallel_region`); return what it returns."""
    if threads == 1:
        return serial(*arguments)
    with parallel_region(threads):
        return parallel(*arguments)


def rois_array(rois: torch.Tensor) -> np.ndarray:
    """(K, 5) float32/float64 C-contiguous NumPy view, or an exact float64 copy of 16-bit rows.

    16-bit rows go through torch's conversion to float64, the one `roi_ops.bad_rois` records
    values with: torch's float16 -> float32 conversion on the CPU turns a NaN into a different
    NaN than its float16 -> float64 conversion does, and the bad-ROI log keeps the bits."""
    if rois.dtype not in _FLOATS:
        rois = rois.double()
    if rois.requires_grad:
        rois = rois.detach()
    return rois.contiguous().numpy()


def levels_array(levels: torch.Tensor) -> np.ndarray:
    """(K,) int64 C-contiguous NumPy view of each ROI's level (a copy if it must be)."""
    levels = levels.detach()
    if levels.dtype != torch.int64 or not levels.is_contiguous():
        levels = levels.to(torch.int64).contiguous()
    return levels.numpy()


class PoolCall:
    """A forward call as the kernels see it: one map (`RoIPoolProblem`) or the L levels of a
    pyramid (`MultiScaleRoIPoolProblem`), the ROIs and, with several levels, each ROI's level.

    features: the L (N, C, H_l, W_l) maps; spatial_scales: their L scales; levels: (K,) int64
    level of each ROI (-1: none), or an empty array when every ROI is on the one map; layout:
    the (L, 7) int64 level table of the kernels (`geometry.LAYOUT_COLUMNS`), offsets into
    `memory.shared_storage` of the features.
    """

    __slots__ = (
        "features", "spatial_scales", "levels", "layout", "rois", "pooled_height",
        "pooled_width", "bad_roi_log",
    )  # fmt: skip

    def __init__(self, problem: RoIPoolProblem | MultiScaleRoIPoolProblem) -> None:
        if isinstance(problem, MultiScaleRoIPoolProblem):
            self.features = problem.features
            self.spatial_scales = problem.spatial_scales
            self.levels = levels_array(problem.levels)
        else:
            self.features = (problem.input,)
            self.spatial_scales = (problem.spatial_scale,)
            self.levels = _ONE_LEVEL
        offsets = level_offsets(self.features)
        self.layout = np.array(
            [
                (offset, *f.stride(), f.shape[3], f.shape[2])
                for f, offset in zip(self.features, offsets, strict=True)
            ],
            dtype=np.int64,
        )
        self.rois = problem.rois
        self.pooled_height = problem.pooled_height
        self.pooled_width = problem.pooled_width
        self.bad_roi_log = problem.bad_roi_log


class BinGeometry:
    """Every ROI's source and bin edges (`geometry.roi_geometry`), and the work estimate,
    computed on `threads` threads (1: in the calling thread).

    source: (K,) ``level * N + image``, -1 for an invalid ROI or one without a level.
    hstart, hend: (K * PH,) rows [start, end) of each bin row; wstart, wend: (K * PW,) columns
    of each bin column; all clamped to the map of the ROI's level. work: pixels the forward
    scans per channel (see `geometry.roi_geometry`).
    """

    __slots__ = ("source", "hstart", "hend", "wstart", "wend", "pooled_h", "pooled_w", "work")

    def __init__(self, call: PoolCall, threads: int) -> None:
        pooled_h, pooled_w = call.pooled_height, call.pooled_width
        rois = rois_array(call.rois)
        count = rois.shape[0]
        self.source = np.empty(count, dtype=np.int64)
        self.hstart = np.empty(count * pooled_h, dtype=np.int64)
        self.hend = np.empty(count * pooled_h, dtype=np.int64)
        self.wstart = np.empty(count * pooled_w, dtype=np.int64)
        self.wend = np.empty(count * pooled_w, dtype=np.int64)
        self.pooled_h, self.pooled_w = pooled_h, pooled_w
        scales = np.array(call.spatial_scales, dtype=np.float64)
        log = call.bad_roi_log
        arguments = (
            rois, call.levels, call.features[0].shape[0], call.layout, scales, pooled_h,
            pooled_w, _GEOMETRY_MODE[call.rois.dtype], self.source, self.hstart, self.hend,
            self.wstart, self.wend, _NO_LOG if log is None else log.numpy(), log is not None,
        )  # fmt: skip
        self.work = run_kernel(
            geometry.roi_geometry, geometry.roi_geometry_parallel, threads, arguments
        )

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
        """(hstart, hend, wstart, wend, PH, PW), as the kernels take them."""
        return self.hstart, self.hend, self.wstart, self.wend, self.pooled_h, self.pooled_w


def forward(
    problem: RoIPoolProblem | MultiScaleRoIPoolProblem,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
    tuning: NumbaTuning,
) -> None:
    """Fill `output` (and `argmax`, unless None) for `problem`; see `Backend.forward` and
    `Backend.forward_multi_scale` (every level's ROIs in one pass).

    Records the first invalid ROI in ``problem.bad_roi_log`` when it is given.
    """
    if problem.rois.shape[0] == 0:
        return
    call = PoolCall(problem)
    features = call.features
    channels = features[0].shape[1]
    readable = any(f.numel() for f in features)
    available = num_threads()
    # The output's size is known before the geometry and about bounds the work from below (a
    # bin reads at least one pixel unless it is empty): calls that large compute the geometry
    # of their many ROIs in parallel too.
    least = output.numel() if readable else 0
    bins = BinGeometry(call, available if least >= tuning.serial_work else 1)
    if output.numel() == 0:
        return
    if not readable:  # N is 0 (every ROI is invalid) or every map is empty (every bin is)
        output.zero_()
        if argmax is not None:
            argmax.fill_(-1)
        return
    threads = 1 if bins.work * channels < tuning.serial_work else available
    advise_tensor(output, tuning.huge_page_min_bytes)
    if argmax is not None:
        advise_tensor(argmax, tuning.huge_page_min_bytes)
    dtype = features[0].dtype
    _warm_up(dtype)
    grouped = dtype in _FLOATS or dtype in _WIDENED
    if grouped and _forward_groups(call, bins, output, argmax, threads, tuning):
        return
    _forward_keys(call, bins, output, argmax, threads, tuning)


def _forward_keys(
    call: PoolCall,
    bins: BinGeometry,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
    threads: int,
    tuning: NumbaTuning,
) -> None:
    """The per-ROI forward (`pool_keys`), every dtype and layout."""
    features = call.features
    dtype = features[0].dtype
    view_dtype, mag_mask, nan_threshold = _BITS[dtype]
    num_images, channels = features[0].shape[:2]
    arguments = (
        shared_storage(features, view_dtype), call.layout, num_images, channels, bins.source,
        *bins.edges(), mag_mask, nan_threshold, output.view(view_dtype).view(-1).numpy(),
        _EMPTY_ARGMAX if argmax is None else argmax.view(-1).numpy(), argmax is not None,
        _keys_block(channels, bins.source.shape[0], threads, bins.pooled_h *
                    bins.pooled_w, tuning),
        tuning.stage_bytes // features[0].element_size(),
    )  # fmt: skip
    run_kernel(pool_keys.pool_keys_serial, pool_keys.pool_keys_parallel, threads, arguments)


def _forward_groups(
    call: PoolCall,
    bins: BinGeometry,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
    threads: int,
    tuning: NumbaTuning,
) -> bool:
    """float32/float64 (and float16/bfloat16, widened) forward by groups of ROIs; False if
    `pool_keys` should run instead.

    Channels-contiguous float32/float64 levels are read in place. Other layouts are staged a
    group's region and a block of channels at a time (a dense image's ROIs together, a sparse
    image's one by one; see `pool_groups.plan_groups`; a group's ROIs are all of one level);
    float16 and bfloat16 regions are always staged, widened exactly to float32, and the results
    narrowed back to their elements' bits. When one channel of a region does not fit a thread's
    buffer (``tuning.stage_max_bytes``), returns False without writing anything.
    """
    features = call.features
    num_images, channels = features[0].shape[:2]
    height = max(f.shape[2] for f in features)
    kind = _WIDENED.get(features[0].dtype, 0)
    scanned = torch.float32 if kind else features[0].dtype
    itemsize = scanned.itemsize
    staged = kind != 0 or any(f.stride(1) != 1 for f in features)
    t = tuning
    order, groups, block, scratch_size = pool_groups.plan_groups(
        bins.source, *bins.edges(), height, channels, itemsize, threads,
        staged, t.tasks_per_thread if threads > 1 else 1, t.min_block, t.max_block,
        t.task_output_bytes, t.stage_min_coverage, t.stage_min_block, t.stage_task_bytes,
        t.stage_max_bytes,
    )  # fmt: skip
    if block == 0:
        return False
    scratch = host_memory.empty((threads if staged else 1, scratch_size), scanned)
    advise_tensor(scratch, tuning.huge_page_min_bytes)
    written = sum(t.numel() * t.element_size() for t in (output, argmax) if t is not None)
    # Streamed: float32/float64 outputs, float16/bfloat16 outputs 16 at a time, and the argmax.
    stream = written >= tuning.stream_min_bytes
    if kind:
        src, bits = _NO_FLOATS, shared_storage(features, torch.int16)
        out, out_bits = _NO_FLOATS, output.view(torch.int16).view(-1).numpy()
    else:
        src, bits = shared_storage(features), _NO_BITS
        out, out_bits = output.view(-1).numpy(), _NO_BITS
    arguments = (
        src, call.layout, num_images, channels, bins.source, order, groups, *bins.edges(), out,
        _EMPTY_ARGMAX if argmax is None else argmax.view(-1).numpy(), argmax is not None,
        block, scratch.numpy(), stream, bits, out_bits, kind,
    )  # fmt: skip
    run_kernel(pool_groups.pool_groups_serial, pool_groups.pool_groups_parallel, threads, arguments)
    return True


def _keys_block(
    channels: int, num_rois: int, threads: int, num_bins: int, tuning: NumbaTuning
) -> int:
    """Channels per `pool_keys` task: enough (ROI, channel block) tasks for every thread, blocks
    bounded so that a task's output and argmax stay within ``tuning.task_output_bytes``."""
    wanted = threads * tuning.tasks_per_thread if threads > 1 else 1
    blocks_wanted = -(-wanted // max(num_rois, 1))
    block = -(-channels // blocks_wanted)
    cap = tuning.task_output_bytes // (8 * max(num_bins, 1))
    cap = max(tuning.min_block, min(tuning.max_block, cap))
    block = max(min(block, cap), min(tuning.min_block, channels))
    return -(-channels // -(-channels // block))  # the same task count, evenly sized


def _backward_block(
    num_images: int, channels: int, plane_bytes: int, threads: int, tuning: NumbaTuning
) -> int:
    """Channels per backward task: blocks within ``tuning.backward_block_bytes``, enough tasks."""
    cap = max(1, tuning.backward_block_bytes // max(plane_bytes, 1))
    wanted = threads * tuning.tasks_per_thread if threads > 1 else 1
    block = max(1, min(cap, num_images * channels // wanted))
    return -(-channels // -(-channels // block))  # the same task count, evenly sized


def backward(problem: RoIPoolBackwardProblem, tuning: NumbaTuning) -> torch.Tensor:
    """Deterministic grad_input, contiguous, of ``problem.input_dtype``; see `Backend.backward`.

    float16/bfloat16 gradients are accumulated in float32 and rounded once. The batch index of
    each ROI is read from ``problem.rois`` inside the kernel.
    """
    (grad,) = _scatter(
        problem.grad_output, problem.argmax, problem.rois, _ONE_LEVEL, (problem.input_shape,),
        problem.input_dtype, tuning,
    )  # fmt: skip
    return grad


def backward_multi_scale(
    problem: MultiScaleRoIPoolBackwardProblem, tuning: NumbaTuning
) -> list[torch.Tensor]:
    """The L deterministic level gradients, contiguous, of ``problem.input_dtype``, in one pass;
    see `Backend.backward_multi_scale`. Summed as `backward` sums one level's."""
    return _scatter(
        problem.grad_output, problem.argmax, problem.rois, levels_array(problem.levels),
        problem.input_shapes, problem.input_dtype, tuning,
    )  # fmt: skip


def _scatter(
    grad_output: torch.Tensor,
    argmax: torch.Tensor,
    rois: torch.Tensor,
    levels: np.ndarray,
    input_shapes: tuple[tuple[int, int, int, int], ...],
    input_dtype: torch.dtype,
    tuning: NumbaTuning,
) -> list[torch.Tensor]:
    """Each level's gradient (N, C, H_l, W_l) from the rows of that level (`levels`, or every
    row on the one level when it is empty), all levels in one parallel pass."""
    num_images, channels = input_shapes[0][:2]
    num_rois = argmax.shape[0]
    acc_dtype = accumulate_dtype(input_dtype)
    if num_rois * channels == 0 or not any(math.prod(shape) for shape in input_shapes):
        return [torch.zeros(shape, dtype=input_dtype) for shape in input_shapes]
    grad = grad_output.detach()
    # 16-bit gradients summed in float32 are read as their raw bits and widened in the kernel
    # (a float32 copy of grad_output would cost more than the sums).
    kind = _WIDENED.get(grad.dtype, 0) if acc_dtype == torch.float32 else 0
    if not kind and grad.dtype != acc_dtype:
        grad = grad.to(acc_dtype)
    pooled_h, pooled_w = argmax.shape[2], argmax.shape[3]
    # The kernel walks each (ROI, channel)'s bins with one stride: a view when the two bin
    # dimensions merge (contiguous, channels_last and expanded gradients do), else a copy.
    grad = grad.flatten(2)
    if argmax.dtype != torch.int32 or not argmax.is_contiguous():
        argmax = argmax.to(torch.int32).contiguous()
    results = [host_memory.empty(shape, acc_dtype) for shape in input_shapes]
    for result in results:
        advise_tensor(result, tuning.huge_page_min_bytes)
    work = sum(r.numel() for r in results) + num_rois * channels * pooled_h * pooled_w
    threads = 1 if work < tuning.serial_work else num_threads()
    # One row per level (plane size, offset, channels per task, first task), as scatter takes it.
    rows, tasks = [], 0
    itemsize = results[0].element_size()
    for (_, _, height, width), offset in zip(input_shapes, level_offsets(results), strict=True):
        plane = height * width
        block = _backward_block(num_images, channels, plane * itemsize, threads, tuning)
        rows.append((plane, offset, block, tasks))
        tasks += num_images * -(-channels // block)
    _warm_up(grad.dtype if kind else acc_dtype, backward=True)
    grad_array = flat_storage(grad, torch.int16) if kind else flat_storage(grad)
    arguments = (
        grad_array, *grad.stride(), kind, flat_storage(argmax), rois_array(rois), levels,
        num_images, channels, np.array(rows, dtype=np.int64), tasks, pooled_h * pooled_w,
        tuning.backward_prefetch_bytes // argmax.element_size(), shared_storage(results),
    )  # fmt: skip
    run_kernel(scatter.scatter_serial, scatter.scatter_parallel, threads, arguments)
    if acc_dtype == input_dtype:
        return results
    return [result.to(input_dtype) for result in results]


_warm: set[tuple[torch.dtype, bool]] = set()


def _warm_up(dtype: torch.dtype, backward: bool = False) -> None:
    """Compile (or load from numba's disk cache) every kernel a call of `dtype` may take.

    Which kernel runs depends on the work (serial or parallel) and, for float32/float64, on how
    much of the map the ROIs cover (grouped or per ROI); loading them all on the first call of
    each dtype keeps later calls, whatever they take, free of compilation. One map or several
    levels take the same specialisations.
    """
    if (dtype, backward) in _warm:
        return
    one = np.ones(1, dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    layout = np.ones((1, 7), dtype=np.int64)
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype if dtype in _FLOATS else None
    if backward:
        # 16-bit gradients are read as raw bits into float32 sums, their rows in float32
        # (autocast) or widened to float64 (`rois_array`).
        kind = _WIDENED.get(dtype, 0)
        grad = np.zeros(1, dtype=np.int16 if kind else np_dtype)
        acc = np.float32 if kind else np_dtype
        argmax = np.zeros(1, dtype=np.int32)
        table = np.array([[1, 0, 1, 0]], dtype=np.int64)
        for rois_dtype in (np.float32, np.float64) if kind else (np_dtype,):
            rois = np.zeros((1, 5), dtype=rois_dtype)
            arguments = (
                grad, 1, 1, 1, kind, argmax, rois, _ONE_LEVEL, 1, 1, table, 1, 1, 1,
                np.zeros(1, acc),
            )  # fmt: skip
            scatter.scatter_serial(*arguments)
            scatter.scatter_parallel(*arguments)
        _warm.add((dtype, backward))
        return
    # 16-bit rows reach the geometry as float64 (`rois_array`); 16-bit maps often come with
    # float32 rows (autocast keeps boxes in float32).
    rois_dtypes = {torch.float32: (np.float32,), torch.float64: (np.float64,)}
    edges = (np.empty(1, np.int64), np.empty(1, np.int64), np.empty(1, np.int64))
    for rois_dtype in rois_dtypes.get(dtype, (np.float32, np.float64)):
        rois = np.zeros((1, 5), dtype=rois_dtype)
        geometry_arguments = (
            rois, _ONE_LEVEL, 1, layout, np.ones(1), 1, 1, 1, *edges, *edges[:2], _NO_LOG, False,
        )  # fmt: skip
        geometry.roi_geometry(*geometry_arguments)
        geometry.roi_geometry_parallel(*geometry_arguments)
    view_dtype, mag_mask, nan_threshold = _BITS[dtype]
    bits = torch.empty((), dtype=view_dtype).numpy().dtype
    keys = (
        np.zeros(1, dtype=bits), layout, 1, 1, zero, zero, one, zero, one, 1, 1,
        mag_mask, nan_threshold, np.zeros(1, dtype=bits), np.zeros(1, dtype=np.int32), True, 1,
        1,
    )  # fmt: skip
    pool_keys.pool_keys_serial(*keys)
    pool_keys.pool_keys_parallel(*keys)
    scanned = np.dtype(np.float32) if dtype in _WIDENED else np_dtype  # the grouped kernels'
    if scanned is not None:
        groups = np.array([[0, 0, 1, 0, 1, 0, 1]], dtype=np.int64)
        floats = (
            np.zeros(1, dtype=scanned), layout, 1, 1, zero, zero, groups, zero, one, zero,
            one, 1, 1, np.zeros(1, dtype=scanned), np.zeros(1, dtype=np.int32), True, 1,
            np.zeros((1, 1), dtype=scanned), True, _NO_BITS, _NO_BITS, 0,
        )  # fmt: skip
        pool_groups.pool_groups_serial(*floats)
        pool_groups.pool_groups_parallel(*floats)
    _warm.add((dtype, backward))


def compiled_signatures() -> int:
    """How many specialisations the kernels have compiled (or loaded) in this process; a count
    that grows during a steady run means a call shape recompiles (see scripts/soak.py)."""
    modules = (geometry, pool_groups, pool_keys, scatter)
    return sum(len(getattr(v, "signatures", ())) for m in modules for v in vars(m).values())
