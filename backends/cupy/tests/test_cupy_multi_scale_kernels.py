"""The CuPy backend's fused multi-level kernels (``*_levels``: every pyramid level in one launch)
against roi_pool of each ROI on its level (the scalar reference, level by level), bit for bit:
on the CPU emulator without a GPU, through CuPy with one (the `runner` fixture). Every layout
(each takes another kernel family), every dtype pair, rows of every level, rows with no level,
invalid rows and the bad-ROI log; the fused atomic backward into each level's gradient."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from cupy_harness import (
    _LAYOUT_KERNELS,
    LAYOUTS,
    check_guards,
    guarded,
    place_input,
    poisoned_outputs,
    sizes,
)
from roi_ops import bad_rois
from roi_ops.backend import MultiScaleRoIPoolProblem, accumulate_dtype
from roi_ops.levels import level_range, roi_levels
from roi_ops.testing import assert_same_bits, reference_by_level, tie_heavy_features
from roi_ops.testing.reference import reference_roi_pool_backward

from roi_ops_cupy import kernels, planning
from roi_ops_cupy.tuning import DEFAULT_TUNING

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
NUM_IMAGES = 2
# The levels of a 256 x 352 image.
MAP_SIZES = ((64, 88), (32, 44), (16, 22), (8, 11))
PAIRS = list(kernels.FORWARD_PAIRS)
PAIR_IDS = [f"{str(t)[6:]}-{str(r)[6:]}" for t, r in PAIRS]


def _features(dtype: torch.dtype, layout: str, seed: int = 0) -> list[torch.Tensor]:
    """The levels, finest first, of ties-heavy values (NaN, -inf, signed zeros among them); 24
    channels for the channels_last layouts (channel-lane kernels), 3 otherwise."""
    channels = 24 if layout.startswith("channels_last") else 3
    levels = []
    for level, (height, width) in enumerate(MAP_SIZES):
        x = tie_heavy_features((NUM_IMAGES, channels, height, width), seed + level, dtype)
        levels.append(x)
    return levels


def _rois(rois_dtype: torch.dtype, count: int = 36, seed: int = 1) -> torch.Tensor:
    """Boxes of every level (log-uniform sides of 16 to 500 pixels) over a 256 x 352 image, some
    cut by the border, then rows that are special for a multi-level call, in random order."""
    g = torch.Generator().manual_seed(seed)
    side = torch.exp(torch.rand(count, 1, generator=g, dtype=torch.float64) * math.log(500 / 16))
    side *= 16
    aspect = torch.exp(torch.rand(count, 1, generator=g, dtype=torch.float64) - 0.5)
    corner = torch.rand(count, 2, generator=g, dtype=torch.float64) * torch.tensor([340.0, 250.0])
    corner -= 8.0
    boxes = torch.cat([corner, corner + torch.cat([side * aspect, side / aspect], 1)], 1)
    batch = torch.randint(0, NUM_IMAGES, (count, 1), generator=g).double()
    batch += torch.rand(count, 1, generator=g, dtype=torch.float64) * 0.9  # truncated
    rows = torch.cat([batch, boxes], 1)
    special = torch.tensor(
        [
            [1, 130.0, 40.0, 20.0, 160.0],  # inverted along x: no level, but a valid row
            [0, 300.0, 200.0, 60.0, 20.0],  # inverted along both: a level, a valid row
            [2, 30.0, 30.0, 90.0, 70.0],  # batch index N: invalid, with a level
            [0, 30.0, math.nan, 90.0, 70.0],  # NaN: invalid, no level
            [-1, 10.0, 10.0, 40.0, 40.0],  # batch index -1: invalid, with a level
            [1, 0.0, 0.0, 351.0, 255.0],  # the whole image
        ],
        dtype=torch.float64,
    )
    order = torch.randperm(count + len(special), generator=g)
    return torch.cat([rows, special])[order].to(rois_dtype)


def _levels(rois: torch.Tensor) -> torch.Tensor:
    """Each ROI's level as roi_ops computes it, then four rows of level 0 moved to levels 1, 2,
    3 and L (outside [0, L): no level, as -1), so that every level pools several rows."""
    levels = roi_levels(rois, *level_range(SCALES))
    moved = (levels == 0).nonzero().squeeze(1)[:4]
    levels[moved] = torch.tensor([1, 2, 3, len(SCALES)])
    return levels


def _per_level_reference(features, rois, levels, size):
    """roi_pool of each ROI on its level (zeros and -1 without one), as a loop over levels."""
    return reference_by_level(features, rois, levels, size, SCALES)


def run_forward_levels(
    runner, features, rois, levels, size, *, layout, needs_argmax=True, log=None, **options
):
    """The fused forward on poisoned outputs, every level placed in `layout`; returns CPU
    (output, argmax or None)."""
    tuning = options.pop("tuning", DEFAULT_TUNING)
    if layout in _LAYOUT_KERNELS and tuning.forward_kernel is None:
        tuning = replace(tuning, forward_kernel=_LAYOUT_KERNELS[layout])
    device = runner.device
    placed = [place_input(x, layout, device) for x in features]
    problem = MultiScaleRoIPoolProblem(
        placed, rois.to(device), levels.to(device), *size, SCALES, needs_argmax, log
    )
    output, out_buf, argmax, arg_buf = poisoned_outputs(
        problem.output_shape, features[0].dtype, device, needs_argmax
    )
    grid_y = options.pop("grid_y", None)
    launch = planning.plan_forward_levels(problem, output, argmax, sizes(**options), tuning)
    if grid_y is not None:  # fewer block rows than channel blocks: the kernels loop
        assert launch.grid[1] > grid_y
        launch = replace(launch, grid=(launch.grid[0], grid_y, 1))
    runner.launch(launch)
    check_guards(out_buf, -7.0)
    check_guards(arg_buf, -7)
    return output.cpu(), (argmax.cpu() if needs_argmax else None)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_fused_forward_is_roi_pool_per_level(runner, pair, layout):
    dtype, rois_dtype = pair
    features = _features(dtype, layout)
    rois = _rois(rois_dtype)
    levels = _levels(rois)
    assert set(levels.tolist()) == {-1, 0, 1, 2, 3, 4}
    size = (3, 2)
    expected, expected_argmax = _per_level_reference(features, rois, levels, size)
    expected_log = bad_rois.new_log()
    bad_rois.record_bad_rois(expected_log, rois, NUM_IMAGES)
    # The first invalid row has no level (it must be recorded all the same), and valid rows
    # without a level come before it (recording one of them would show).
    no_level = ((levels < 0) | (levels >= len(SCALES))).nonzero().squeeze(1).tolist()
    first_bad = bad_rois.decode(expected_log).row
    assert first_bad in no_level and min(no_level) < first_bad
    for needs_argmax in (True, False):
        log = bad_rois.new_log(runner.device)
        output, argmax = run_forward_levels(
            runner, features, rois, levels, size, layout=layout, needs_argmax=needs_argmax,
            log=log,
        )  # fmt: skip
        assert_same_bits(output, expected)
        if needs_argmax:
            assert torch.equal(argmax, expected_argmax)
        assert torch.equal(log.cpu(), expected_log)


@pytest.mark.parametrize("layout", ["contiguous_unit", "channels_last_cvec", "strided"])
def test_channel_blocks_loop(runner, layout):
    """72 channels in blocks of a few: grid rows fewer than channel blocks, and enough of them."""
    g = torch.Generator().manual_seed(12)
    features = [torch.randn(NUM_IMAGES, 72, h, w, generator=g) for h, w in MAP_SIZES]
    rois = _rois(torch.float32, count=12, seed=13)
    levels = _levels(rois)
    expected, expected_argmax = _per_level_reference(features, rois, levels, (2, 3))
    for options in ({"multiprocessors": 64, "grid_y": 1}, {"multiprocessors": 64}):
        output, argmax = run_forward_levels(
            runner, features, rois, levels, (2, 3), layout=layout, **options
        )
        assert_same_bits(output, expected)
        assert torch.equal(argmax, expected_argmax)


GRADIENT_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def run_backward_levels(runner, grad_output, argmax, rois, levels, shapes, layout, **options):
    """The fused backward (``kernel``: the atomic kernel into zero-filled accumulators, or the
    planes kernel into NaN-poisoned gradients of grad_output's dtype), each gradient in
    `layout` inside guard buffers; with `grid_y`, fewer grid rows than channel blocks."""
    device = runner.device
    grid_y = options.pop("grid_y", None)
    kernel = options.pop("kernel", kernels.BACKWARD_ATOMIC_LEVELS)
    planes = kernel == kernels.BACKWARD_PLANES_LEVELS
    written = grad_output.dtype if planes else accumulate_dtype(grad_output.dtype)
    fmt = GRADIENT_LAYOUTS[layout]
    grads, buffers = [], []
    for shape in shapes:
        strides = torch.empty(shape, device="meta", memory_format=fmt).stride()
        grad, buffer = guarded(shape, strides, written, device, -7.0)
        grads.append(grad.fill_(math.nan) if planes else grad.zero_())
        buffers.append(buffer)
    rois, levels = rois.to(device), levels.to(device)
    groups = groups_buffer = None
    if planes:
        groups, groups_buffer = run_group_rois(runner, rois, levels, len(shapes), shapes[0][0])
    launch = planning.plan_backward_levels(
        grad_output.to(device), argmax.to(device), rois, levels, grads, sizes(**options),
        kernel=kernel, groups=groups,
    )  # fmt: skip
    if grid_y is not None:
        assert launch.grid[1] > 1
        launch = replace(launch, grid=(launch.grid[0], grid_y, 1))
    runner.launch(launch)
    for buffer in buffers:
        check_guards(buffer, -7.0)
    if groups_buffer is not None:
        check_guards(groups_buffer, -7)
    return [grad.cpu() for grad in grads]


def run_group_rois(runner, rois, levels, num_levels, num_images):
    """The ROI grouping into a poisoned int32 buffer inside guards: (buffer, guarded)."""
    size = planning.group_rois_size(rois.shape[0], num_levels, num_images)
    groups, buffer = guarded((size,), (1,), torch.int32, runner.device, -7)
    groups.fill_(-5)
    runner.launch(planning.plan_group_rois(rois, levels, num_levels, num_images, groups))
    return groups, buffer


@pytest.mark.parametrize("counts", ["shared", "global"])
@pytest.mark.parametrize("rois_dtype", list(kernels.C_TYPES), ids=str)
def test_group_rois_lists_each_level_and_image(runner, rois_dtype, counts, monkeypatch):
    """Each (level, image) group lists exactly the ROIs of that level whose batch index (as
    the backward reads it: clamped to [0, N)) is that image; rows with no level are in none;
    strided rois and levels; more ROIs than the block has threads; the counters in shared
    memory or in the buffer. Without levels, one level: each image's ROIs."""
    if counts == "global":
        monkeypatch.setattr(planning, "GROUP_SHARED_COUNTS_BYTES", 0)
    device = runner.device
    base = _rois(rois_dtype)
    rois = torch.cat([base] * 40)  # 1680 rows
    levels = torch.cat([_levels(base)] * 40)
    strided_rois = torch.empty(rois.shape[0], 7, dtype=rois_dtype)[:, 1:6].copy_(rois)
    strided_levels = torch.zeros(rois.shape[0], 2, dtype=torch.int64)[:, 1].copy_(levels)
    num_levels, num_images = len(SCALES), NUM_IMAGES
    groups, buffer = run_group_rois(
        runner, strided_rois.to(device), strided_levels.to(device), num_levels, num_images
    )
    check_guards(buffer, -7)
    groups = groups.cpu()
    num_rois = rois.shape[0]
    first = groups[num_rois:].tolist()
    batch = rois[:, 0].double()
    image = torch.where(batch >= 1, batch.clamp(max=num_images - 1).trunc(), 0).long()
    has_level = (levels >= 0) & (levels < num_levels)
    assert first[0] == 0 and first[-1] == int(has_level.sum())
    for level in range(num_levels):
        for n in range(num_images):
            g = level * num_images + n
            listed = sorted(groups[first[g] : first[g + 1]].tolist())
            expected = ((levels == level) & (image == n)).nonzero().squeeze(1).tolist()
            assert listed == expected, f"level {level} image {n}"
    groups, buffer = run_group_rois(runner, strided_rois.to(device), None, 1, num_images)
    check_guards(buffer, -7)
    groups = groups.cpu()
    first = groups[num_rois:].tolist()
    assert first[0] == 0 and first[-1] == num_rois
    for n in range(num_images):
        listed = sorted(groups[first[n] : first[n + 1]].tolist())
        assert listed == (image == n).nonzero().squeeze(1).tolist(), f"image {n}"


@pytest.mark.parametrize("layout", list(GRADIENT_LAYOUTS))
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_fused_backward_adds_into_each_level(runner, pair, layout):
    """Each ROI's gradients land in its level's gradient (none for rows without a level or
    invalid ones), through the atomic kernel and the planes kernel; integer gradients, so that
    the sums are exact in any order; real and zero-stride grad_output, one or many channel
    blocks."""
    dtype, rois_dtype = pair
    features = _features(dtype, "contiguous")
    rois = _rois(rois_dtype)
    levels = _levels(rois)
    size = (3, 2)
    _, argmax = _per_level_reference(features, rois, levels, size)
    g = torch.Generator().manual_seed(4)
    grad = torch.randint(-3, 4, argmax.shape, generator=g).to(dtype)
    zero_strides = grad[:, :, :1, :1].expand(grad.shape)
    shapes = [tuple(x.shape) for x in features]
    planes = {"kernel": kernels.BACKWARD_PLANES_LEVELS}
    for grad_output, options in [
        (grad, {}),
        (grad, {"multiprocessors": 64, "grid_y": 1}),
        (zero_strides, {}),
        (grad, planes),  # one channel per block on the finest level, more on coarser ones
        (grad, {**planes, "multiprocessors": 64}),  # levels split into more blocks
        (zero_strides, planes),
    ]:
        grads = run_backward_levels(
            runner, grad_output, argmax, rois, levels, shapes, layout, **options
        )
        for level, (shape, result) in enumerate(zip(shapes, grads, strict=True)):
            rows = (levels == level).nonzero().squeeze(1)
            expected = reference_roi_pool_backward(
                grad_output[rows], argmax[rows], rois[rows], shape
            )
            assert torch.equal(result.to(torch.float64), expected), f"level {level}"
            assert bool(expected.ne(0).any())  # real sums, not zeros
