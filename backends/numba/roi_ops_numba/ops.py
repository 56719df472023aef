"""Glue between torch tensors and the numba kernels: zero-copy views, work split, threads.

Importing this module imports numba (through `roi_ops_numba.kernels`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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
# Inputs whose channels are not contiguous (NCHW): the largest channels-last copy of a ROI's
# window (or bin row's band) a task makes, to stay in L2; larger ones are gathered in place.
_STAGE_BYTES = 512 * 1024

_EMPTY_ARGMAX = np.empty(0, dtype=np.int32)


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


def _block(channels: int, num_rois: int, threads: int) -> int:
    """Channels per task: enough (ROI, channel block) tasks for every thread, blocks bounded."""
    blocks_wanted = -(-threads * _TASKS_PER_THREAD // max(num_rois, 1))
    block = -(-channels // blocks_wanted)
    block = max(min(block, _MAX_BLOCK), min(_MIN_BLOCK, channels))
    return -(-channels // -(-channels // block))  # the same task count, evenly sized


def forward(problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None) -> None:
    """Fill `output` (and `argmax`, unless None) for `problem`; see `Backend.forward`."""
    input = problem.input
    num_images, channels, height, width = input.shape
    if output.numel() == 0:
        return
    if input.numel() == 0:  # N, H or W is 0: every ROI is invalid or every bin empty
        output.zero_()
        if argmax is not None:
            argmax.fill_(-1)
        return

    view_dtype, mag_mask, nan_threshold = _BITS[input.dtype]
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

    src = flat_storage(input, view_dtype)
    s_n, s_c, s_h, s_w = input.stride()
    out = output.view(view_dtype).view(-1).numpy()
    arg = _EMPTY_ARGMAX if argmax is None else argmax.view(-1).numpy()
    threads = num_threads()
    block = _block(channels, num_rois, threads)
    with _parallel_region(threads):
        kernels.pool_forward(
            src, s_n, s_c, s_h, s_w, channels, width,
            batch, hstart, hend, wstart, wend, pooled_h, pooled_w,
            mag_mask, nan_threshold, out, arg, argmax is not None, block,
            _STAGE_BYTES // input.element_size(),
        )  # fmt: skip


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
    with _parallel_region(num_threads()):
        kernels.scatter_backward(
            flat_storage(grad), g_k, g_c, g_h, g_w,
            argmax.detach().to(torch.int32).contiguous().view(-1).numpy(),
            order, image_start.numpy(), channels, height * width, pooled_h, pooled_w,
            result.view(-1).numpy(),
        )  # fmt: skip
    return result if acc_dtype == input_dtype else result.to(input_dtype)
