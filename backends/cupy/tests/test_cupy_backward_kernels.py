"""The CuPy backend's backward kernels (atomic and planes) against the scalar reference: on the
CPU emulator without a GPU, through CuPy on a CUDA device (the `runner` fixture). Each kernel
reads the ROIs' batch indices from the rois itself, but the grouped planes kernel, which reads
each image's ROIs from the grouping launch's list."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from cupy_harness import DTYPE_IDS, DTYPES, check_guards, guarded, rois_dtype_for, sizes, wide
from roi_ops.backend import accumulate_dtype
from roi_ops.testing.cases import contract_cases
from roi_ops.testing.reference import (
    backward_error_bound,
    reference_roi_pool,
    reference_roi_pool_backward,
)

from roi_ops_cupy import kernels, planning
from roi_ops_cupy.tuning import DEFAULT_TUNING

GRADIENT_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _gradient_strides(shape, layout: str) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=GRADIENT_LAYOUTS[layout]).stride()


PLANES_KERNELS = (kernels.BACKWARD_PLANES, kernels.BACKWARD_PLANES_GROUPED)


def run_planes(
    runner, grad_output, argmax, rois, shape, dtype, layout, tuning=DEFAULT_TUNING,
    kernel=kernels.BACKWARD_PLANES,
):  # fmt: skip
    """grad_input (in `layout`) from a planes kernel, poisoned first (every element must be
    written), inside a guard buffer; the grouped one after the grouping launch, which writes a
    buffer poisoned first too."""
    strides = _gradient_strides(shape, layout)
    grad_input, buffer = guarded(shape, strides, dtype, runner.device, -7.0)
    grad_input.fill_(math.nan)
    groups = None
    if kernel == kernels.BACKWARD_PLANES_GROUPED:
        num_images = shape[0]
        size = planning.group_rois_size(rois.shape[0], 1, num_images)
        groups = torch.full((size,), -7, dtype=torch.int32, device=runner.device)
        runner.launch(planning.plan_group_rois(rois, None, 1, num_images, groups))
    launch = planning.plan_backward(
        grad_output, argmax, rois, grad_input, kernel, sizes(1), tuning, groups
    )
    runner.launch(launch)
    check_guards(buffer, -7.0)
    return grad_input


def run_atomic(runner, grad_output, argmax, rois, shape, layout, multiprocessors=1, grid_y=None):
    """grad_input (accumulator dtype, in `layout`, zero-filled inside a guard buffer) from the
    atomic kernel; with `grid_y`, one grid row fewer than its channel blocks (the kernel loops)."""
    accumulate = accumulate_dtype(grad_output.dtype)
    strides = _gradient_strides(shape, layout)
    grad_input, buffer = guarded(shape, strides, accumulate, runner.device, -7.0)
    grad_input.zero_()
    launch = planning.plan_backward(
        grad_output, argmax, rois, grad_input, kernels.BACKWARD_ATOMIC, sizes(multiprocessors)
    )
    if grid_y is not None:
        assert launch.grid[1] > 1
        launch = replace(launch, grid=(launch.grid[0], grid_y, 1))
    runner.launch(launch)
    check_guards(buffer, -7.0)
    return grad_input


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", list(GRADIENT_LAYOUTS))
def test_backward_scatter(runner, dtype, layout):
    """Both backward kernels into a gradient in `layout`, with real and zero-stride grad_output,
    one or many channel blocks, rois with a column stride."""
    case = contract_cases("cpu", dtype, seed=2)[0]
    x, rois = wide(case.input, 5), case.rois_tensor()
    _, argmax = reference_roi_pool(x, rois, case.output_size, case.spatial_scale)
    g = torch.Generator().manual_seed(4)
    grad = torch.randint(1, 5, argmax.shape, generator=g).to(dtype)
    expected = reference_roi_pool_backward(grad, argmax, rois, tuple(x.shape))
    device = runner.device
    # rois as a column-major view: the kernels read column 0 with the row stride
    strided_rois = rois.t().contiguous().t().to(device)
    zero_strides = grad[:, :, :1, :1].to(device).expand(grad.shape)
    for grad_output, (multiprocessors, grid_y) in [
        (grad.to(device), (1, None)),
        (grad.to(device), (64, 1)),
        (zero_strides, (1, None)),
        (zero_strides, (64, 1)),
    ]:
        reference = expected
        if grad_output.stride(3) == 0:  # every bin carries grad[k, c, 0, 0]
            reference = reference_roi_pool_backward(grad_output.cpu(), argmax, rois, tuple(x.shape))
        result = run_atomic(
            runner, grad_output, argmax.to(device), strided_rois, x.shape, layout,
            multiprocessors, grid_y,
        )  # fmt: skip
        assert torch.equal(result.cpu().to(torch.float64), reference)
        # The planes kernels: one channel per block, then blocks of 2 (the last one short);
        # blocks of 256 and of 1024 threads; scanning the ROIs and reading their lists.
        for channels, threads, kernel in itertools.product(
            (1, 2), kernels.PLANES_THREADS, PLANES_KERNELS
        ):
            tuning = replace(DEFAULT_TUNING, planes_channels=channels, planes_threads=threads)
            planes = run_planes(
                runner, grad_output, argmax.to(device), strided_rois, x.shape, dtype, layout,
                tuning, kernel,
            )  # fmt: skip
            assert torch.equal(planes.cpu(), reference.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "kernel, threads",
    [(kernels.BACKWARD_ATOMIC, None)]
    + [(kernel, t) for kernel in PLANES_KERNELS for t in kernels.PLANES_THREADS],
)
@pytest.mark.parametrize("layout", list(GRADIENT_LAYOUTS))
def test_backward_many_rois_in_rounds(runner, dtype, kernel, threads, layout):
    """2600 ROIs (the planes kernels take an image's ROIs 1024 at a time, the last round
    short), images interleaved, some ROIs invalid (batch index N, -1, NaN, fractional), into a
    gradient in `layout`; float16/bfloat16 sums pass their precision and are rounded once."""
    g = torch.Generator().manual_seed(7)
    num_images, channels, height, width = 3, 2, 9, 11
    x = torch.randn(num_images, channels, height, width, generator=g).to(dtype)
    k = 2600
    corners = torch.rand(k, 2, generator=g) * torch.tensor([width - 1.0, height - 1.0])
    box_sizes = torch.rand(k, 2, generator=g) * 5
    batch_values = torch.randint(0, num_images, (k,), generator=g).double()
    batch_values += torch.rand(k, generator=g) * 0.9  # truncated
    batch_values[::37] = num_images  # out of range: every bin empty, no gradient
    batch_values[5::41] = -1.0
    batch_values[7::43] = math.nan
    rois = torch.cat([batch_values[:, None], corners, corners + box_sizes], dim=1)
    rois = rois.to(rois_dtype_for(dtype))
    _, argmax = reference_roi_pool(x, rois, (3, 2), 1.0)
    grad = (torch.randn(argmax.shape, generator=g) * 3).to(dtype)
    expected = reference_roi_pool_backward(grad, argmax, rois, tuple(x.shape))
    device = runner.device
    args = (grad.to(device), argmax.to(device), rois.to(device))
    if kernel in PLANES_KERNELS:
        tuning = replace(DEFAULT_TUNING, planes_threads=threads)
        result = run_planes(runner, *args, tuple(x.shape), dtype, layout, tuning, kernel).cpu()
    else:
        result = run_atomic(runner, *args, x.shape, layout).cpu().to(dtype)
    # Atomic sums come in any order: within the summation bound of the exact float64 sum.
    bound = backward_error_bound(grad, argmax, rois, tuple(x.shape), accumulate_dtype(dtype), dtype)
    error = (result.double() - expected).abs()
    assert bool(error.le(bound).all()), f"worst excess {(error - bound).max().item()}"
    assert bool(expected.ne(0).sum() > 100)  # real sums, not zeros
