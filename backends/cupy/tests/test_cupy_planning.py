"""The CuPy backend's launch planning (no GPU, no kernels run): which kernel a call takes, its
grid, block, shared memory and named arguments, and how a `CupyTuning` changes them."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cupy_harness import DTYPES, place_input, sizes
from roi_ops.backend import MultiScaleRoIPoolProblem, RoIPoolProblem

from roi_ops_cupy import kernels, planning
from roi_ops_cupy.tuning import DEFAULT_TUNING, CupyTuning

OPTIN = 227 * 1024


def _problem(x, rois=None, size=7, needs_argmax=True, log=None) -> RoIPoolProblem:
    rois = torch.zeros(3, 5) if rois is None else rois
    return RoIPoolProblem(x, rois, size, size, 0.5, needs_argmax, bad_roi_log=log)


def _outputs(problem):
    out = torch.empty(problem.output_shape)
    return out, torch.empty(problem.output_shape, dtype=torch.int32)


def test_forward_kernel_by_layout_alignment_and_outputs_per_roi():
    def last(c, dtype=torch.float32):
        return torch.empty(2, c, 5, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)

    choose = planning.forward_kernel
    assert [planning.cvec_lanes(d) for d in DTYPES] == [8, 8, 4, 2]
    assert [planning.cvec_thread_channels(d, True) for d in DTYPES] == [8, 8, 8, 4]
    assert [planning.cvec_thread_channels(d, False) for d in DTYPES] == [16, 16, 8, 4]
    assert choose(torch.empty(2, 64, 5, 6), 9) == kernels.FORWARD_SMALL  # 576 outputs per ROI
    assert choose(torch.empty(2, 64, 5, 6), 16) == kernels.FORWARD_SMALL  # 1024
    assert choose(torch.empty(2, 64, 5, 6), 17) == kernels.FORWARD_UNIT  # 1088
    assert choose(torch.empty(2, 1, 5, 6), 2049) == kernels.FORWARD_UNIT  # a table too large
    assert choose(torch.empty(2, 64, 5, 6), 9, CupyTuning(small_roi_outputs=0)) == (
        kernels.FORWARD_UNIT
    )
    assert choose(last(20), 49) == kernels.FORWARD_SMALL_CVEC  # 980 outputs per ROI
    assert choose(last(24), 49) == kernels.FORWARD_CVEC  # 1176
    assert choose(last(20, torch.float16), 49) == kernels.FORWARD_CHAN
    assert choose(last(20)[:, 1:17], 49) == kernels.FORWARD_CHAN  # 4 bytes in
    assert choose(last(8), 1) == kernels.FORWARD_PLANE  # too few channels for lanes
    assert choose(torch.empty(2, 3, 5, 12)[..., ::2], 1) == kernels.FORWARD_PLANE


def test_forced_forward_kernels_only_where_they_run():
    x = torch.empty(2, 20, 5, 6)
    for kernel in (kernels.FORWARD_PLANE, kernels.FORWARD_CHAN, kernels.FORWARD_SMALL):
        assert planning.forward_kernel(x, 49, CupyTuning(forward_kernel=kernel)) == kernel
    strided = x[..., ::2]
    forced_unit = CupyTuning(forward_kernel=kernels.FORWARD_UNIT)
    assert planning.forward_kernel(strided, 49, forced_unit) == kernels.FORWARD_PLANE
    forced_cvec = CupyTuning(forward_kernel=kernels.FORWARD_CVEC)
    assert planning.forward_kernel(x, 49, forced_cvec) == kernels.FORWARD_SMALL
    last = x.contiguous(memory_format=torch.channels_last)
    assert planning.forward_kernel(last, 49, forced_unit) == kernels.FORWARD_SMALL_CVEC
    forced_small = CupyTuning(forward_kernel=kernels.FORWARD_SMALL)
    assert planning.forward_kernel(x, 50 * 50, forced_small) == kernels.FORWARD_UNIT


def test_small_plans_many_rois_per_block():
    x = torch.ones(4, 64, 10, 13)
    problem = _problem(x, torch.zeros(1000, 5), size=3, log=torch.zeros(12, dtype=torch.int64))
    out, arg = _outputs(problem)
    small = planning.plan_forward(problem, out, arg, sizes(1))
    assert small.name == "roi_pool_forward_small<float, float, true>"
    assert small.value("rois_per_block") == 7 and small.value("K") == 1000  # 4096 // 576
    assert small.grid == (143, 1, 1) and small.block == (256, 1, 1)
    assert small.shared_mem == 7 * 9 * planning.SMALL_BIN_BYTES
    # Enough blocks for the GPU: 8 per SM of 132 want 1056 blocks.
    assert planning.plan_forward(problem, out, arg, sizes(132)).value("rois_per_block") == 1
    assert planning.small_rois_per_block(10**6, 4, 9 * 24, sizes(1), DEFAULT_TUNING) == 227
    # small_cvec: the table and the staged outputs (values and argmax) in 48 KiB
    last = torch.ones(4, 64, 10, 13).contiguous(memory_format=torch.channels_last)
    staged = _problem(last, torch.zeros(1000, 5), size=3)
    plan = planning.plan_forward(staged, out, arg, sizes(1))
    assert plan.name == "roi_pool_forward_small_cvec<float, float, true>"
    assert plan.value("rois_per_block") == 7
    assert plan.shared_mem == 7 * 9 * (24 + 64 * 8)  # 64 channels' values and argmax
    small_cvec = kernels.FORWARD_SMALL_CVEC
    assert planning.small_roi_bytes(small_cvec, 9, 62, torch.float64, False) == 9 * (24 + 64 * 8)
    assert planning.small_roi_bytes(small_cvec, 9, 20, torch.float16, True) == 9 * (24 + 24 * 8)
    assert planning.small_roi_bytes(small_cvec, 9, 20, torch.float16, False) == 9 * (24 + 32 * 2)
    assert planning.small_roi_bytes(small_cvec, 9, 12, torch.float32, False) == 9 * (24 + 16 * 4)
    tuned = CupyTuning(small_block_elements=1152)
    assert planning.plan_forward(problem, out, arg, sizes(1), tuned).value("rois_per_block") == 2


def test_unit_plan_sizes_channel_blocks_by_l2():
    x = torch.ones(2, 64, 10, 10)
    problem = _problem(x)
    out, arg = _outputs(problem)
    unit = planning.plan_forward(problem, out, arg, sizes(132))
    assert unit.name == "roi_pool_forward_unit<float, float, true>"
    # The ROI's geometry (16 bytes) and its PH + PW = 14 bin edges, computed once per block.
    assert unit.block == (256, 1, 1) and unit.shared_mem == 16 + 8 * 14
    per_block = unit.value("channels_per_block")
    assert unit.grid == (3, math.ceil(64 / per_block), 1)
    # More bins than a block's default shared memory holds edges for: the plane kernel.
    assert planning.forward_kernel(x, planning.UNIT_MAX_BINS) == kernels.FORWARD_UNIT
    assert planning.forward_kernel(x, planning.UNIT_MAX_BINS + 1) == kernels.FORWARD_PLANE
    assert unit.value("argmax") == arg.data_ptr() and unit.value("bad_roi_log") == 0
    # Unit channel blocks hold whole steps: 4 channels (2 for float64) in each group of bins.
    assert planning.whole_unit_steps(41, 196, torch.float32) == 40
    assert planning.whole_unit_steps(167, 49, torch.float32) == 160
    assert planning.whole_unit_steps(41, 196, torch.float64) == 40
    assert planning.whole_unit_steps(7, 49, torch.float64) == 7  # less than one step: kept
    assert planning.whole_unit_steps(23, 49, torch.float64) == 20
    big = _problem(torch.ones(2, 4096, 10, 10), torch.zeros(600, 5))
    out, arg = _outputs(big)
    cached = planning.plan_forward(big, out, arg, sizes(1, l2_bytes=2**30))
    streamed = planning.plan_forward(big, out, arg, sizes(1, l2_bytes=2**10))
    assert cached.value("channels_per_block") == 160  # 8192 outputs: 5 groups of 49 bins
    assert streamed.value("channels_per_block") == 20  # 1024 outputs
    tuned = replace(DEFAULT_TUNING, unit_block_elements_streamed=2048)
    assert planning.plan_forward(big, out, arg, sizes(1), tuned).value("channels_per_block") == 40
    # Streamed blocks hold the same bytes of planes whatever the dtype: 2048 float16 outputs.
    half = _problem(torch.ones(2, 4096, 10, 10, dtype=torch.float16), torch.zeros(600, 5))
    half_out, half_arg = _outputs(half)
    half_plan = planning.plan_forward(half, half_out, half_arg, sizes(1, l2_bytes=2**10))
    assert half_plan.value("channels_per_block") == 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_unit_plan_streams_larger_channel_blocks(dtype):
    # Levels that do not fit in L2 together: unit_block_elements_levels (4096 outputs for
    # 4-byte elements: 80 channels of 49 bins in whole steps of 20; twice the outputs in
    # float16); together in L2: the cached plan (8192: 160 channels).
    features = [torch.ones(2, 1024, 16, 16, dtype=dtype), torch.ones(2, 1024, 8, 8, dtype=dtype)]
    rois = torch.zeros(600, 5)
    levels = torch.zeros(600, dtype=torch.int64)
    problem = MultiScaleRoIPoolProblem(features, rois, levels, 7, 7, (1.0, 0.5), True)
    out = torch.empty(problem.output_shape, dtype=dtype)
    arg = torch.empty(problem.output_shape, dtype=torch.int32)
    streamed = planning.plan_forward_levels(problem, out, arg, sizes(1, l2_bytes=2**10))
    cached = planning.plan_forward_levels(problem, out, arg, sizes(1, l2_bytes=2**30))
    assert streamed.name.startswith(kernels.levels_kernel(kernels.FORWARD_UNIT))
    assert streamed.value("channels_per_block") == (80 if dtype == torch.float32 else 160)
    assert cached.value("channels_per_block") == 160


def test_cvec_tile_size_matches_the_kernel():
    source = (Path(kernels.__file__).parent / "cuda" / "forward_cvec.cu").read_text()
    match = re.search(r"constexpr int kCvecTileBytes = (\d+);", source)
    assert match and int(match.group(1)) == planning.CVEC_TILE_BYTES
    match = re.search(r"constexpr int kCvecBlocksPerSM = (\d+);", source)
    assert match and int(match.group(1)) == planning.CVEC_BLOCKS_PER_SM


def test_cvec_blocks_fit_their_tile_in_one_round():
    # mask-14's 196 bins: 64 channels of float16 values fit the 32 KiB tile; float32 values
    # take 32 channels, and with the argmax 16 (float16 values then sit in 32-bit slots).
    capacity = planning.cvec_tile_outputs
    assert capacity(torch.float16, False) == 16384 and capacity(torch.float32, False) == 8192
    assert capacity(torch.float32, True) == capacity(torch.float16, True) == 4096
    assert capacity(torch.float64, True) == 2728
    per_block = planning.cvec_channels_per_block
    tuning = DEFAULT_TUNING
    for dtype, argmax, expected in [
        (torch.float16, False, 64),
        (torch.float32, False, 32),
        (torch.float32, True, 16),
        (torch.float16, True, 16),
        (torch.float64, True, 8),
    ]:
        channels = per_block(4096, 256, 196, dtype, argmax, 132, tuning)
        assert channels == expected, (dtype, argmax)
        assert channels * 196 <= capacity(dtype, argmax)
    assert per_block(4096, 256, 49, torch.float32, True, 132, tuning) == 64  # 49 bins: 8 threads
    # One vector's bins beyond the tile: one thread a bin, the kernel pools in rounds of bins.
    assert per_block(4, 256, 4200, torch.float32, True, 132, tuning) == 8


def test_cvec_kernel_only_where_an_image_has_32_bit_offsets():
    fits = torch.empty(1, 16, 2**13, 2**13, device="meta").contiguous(
        memory_format=torch.channels_last
    )  # 2^30 elements an image
    beyond = torch.empty(2, 16, 2**14 + 1, 2**13, device="meta").contiguous(
        memory_format=torch.channels_last
    )  # an offset of 2^31 in each image
    assert planning.forward_kernel(fits, 196) == kernels.FORWARD_CVEC  # 3136 outputs a ROI
    assert planning.forward_kernel(beyond, 196) == kernels.FORWARD_CHAN
    levels = [fits[:, :, :8, :8], beyond]
    assert planning.forward_levels_kernel(levels, 196) == kernels.FORWARD_CHAN


def test_cvec_wide_in_float32_inference_in_l2_and_forwards_with_the_large_tile_in_l2():
    fits = torch.ones(2, 64, 10, 10).contiguous(memory_format=torch.channels_last)  # 51 KB
    in_l2, no_l2 = sizes(1, 50 * 2**20), sizes(1, 32 * 2**10)
    small_shared = sizes(1, 50 * 2**20, 163 * 1024)  # an A100's: 4 large tiles do not fit
    assert planning.cvec_large_tile(in_l2, DEFAULT_TUNING)
    assert not planning.cvec_large_tile(small_shared, DEFAULT_TUNING)
    assert planning.cvec_wide(fits, False, in_l2)
    assert not planning.cvec_wide(fits, False, no_l2)  # beyond L2
    assert not planning.cvec_wide(fits, False, sizes(1))  # no L2 known: not cached
    assert planning.cvec_wide(fits, True, in_l2)  # the argmax: in L2 with the large tile,
    assert not planning.cvec_wide(fits, True, small_shared)  # not with the static one
    assert planning.cvec_wide(fits, True, no_l2)  # and beyond L2
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert not planning.cvec_wide(fits.to(dtype), False, in_l2)
        assert not planning.cvec_wide(fits.to(dtype), True, no_l2)
    assert planning.cvec_wide(fits, False, no_l2, CupyTuning(cvec_wide=True))
    assert not planning.cvec_wide(fits, True, in_l2, CupyTuning(cvec_wide=False))
    # The large tile: the wide kernel's float32 forward with the argmax on a map in L2 only.
    tile = planning.cvec_tile_bytes
    large, static = DEFAULT_TUNING.cvec_wide_tile_bytes, planning.CVEC_TILE_BYTES
    assert large > static
    assert tile(torch.float32, True, True, 51200, in_l2, DEFAULT_TUNING) == large
    assert tile(torch.float32, True, True, 51200, no_l2, DEFAULT_TUNING) == static
    assert tile(torch.float32, True, True, 51200, small_shared, DEFAULT_TUNING) == static
    assert tile(torch.float32, False, True, 51200, in_l2, DEFAULT_TUNING) == static
    assert tile(torch.float32, True, False, 51200, in_l2, DEFAULT_TUNING) == static
    assert tile(torch.float16, True, True, 51200, in_l2, DEFAULT_TUNING) == static
    # 7x7 bins: eight lanes of 16 channels in the large tile, four in the static one.
    assert planning.cvec_tile_outputs(torch.float32, True, large) >= 8 * 16 * 49
    per_block = planning.cvec_channels_per_block
    assert per_block(4096, 256, 49, torch.float32, True, 132, DEFAULT_TUNING, True, large) == 128
    assert per_block(4096, 256, 49, torch.float32, True, 132, DEFAULT_TUNING, True) == 64
    # Four vectors a thread in float32, with the argmax too.
    assert [planning.cvec_thread_channels(d, False, wide=True) for d in DTYPES] == [16, 16, 16, 4]
    assert [planning.cvec_thread_channels(d, True, wide=True) for d in DTYPES] == [8, 8, 16, 4]
    inference = _problem(fits, needs_argmax=False)
    out, arg = _outputs(inference)
    plan = planning.plan_forward(inference, out, None, in_l2)
    assert plan.name == "roi_pool_forward_cvec_wide<float, float, false>"
    # 4 threads of 16 channels per bin give 3 x 1 blocks, fewer than 8 per SM: halved twice.
    assert plan.value("channels_per_block") == 16 and plan.grid == (3, 4, 1)
    assert planning.plan_forward(inference, out, None, no_l2).name.startswith(
        kernels.FORWARD_CVEC + "<"
    )
    forward = _problem(fits)
    out, arg = _outputs(forward)
    plan = planning.plan_forward(forward, out, arg, in_l2)
    assert plan.name == "roi_pool_forward_cvec_wide<float, float, true>"
    assert plan.shared_mem == large and plan.value("channels_per_block") % 16 == 0
    plan = planning.plan_forward(forward, out, arg, no_l2)
    assert plan.name == "roi_pool_forward_cvec_wide<float, float, true>"
    assert plan.shared_mem == static
    plan = planning.plan_forward(forward, out, arg, small_shared)
    assert plan.name == "roi_pool_forward_cvec<float, float, true>" and plan.shared_mem == 0
    # A forced kernel runs as named.
    forced = CupyTuning(forward_kernel=kernels.FORWARD_CVEC)
    plan = planning.plan_forward(inference, out, None, in_l2, forced)
    assert plan.name == "roi_pool_forward_cvec<float, float, false>"
    forced = CupyTuning(forward_kernel=kernels.FORWARD_CVEC_WIDE)
    plan = planning.plan_forward(inference, out, None, no_l2, forced)
    assert plan.name == "roi_pool_forward_cvec_wide<float, float, false>"


def test_plane_cvec_and_chan_plans():
    x = torch.ones(2, 64, 10, 20)[..., ::2]
    problem = _problem(x)
    out, arg = _outputs(problem)
    plane = planning.plan_forward(problem, out, arg, sizes(132))
    assert plane.name == "roi_pool_forward_plane<float, float, true>"
    assert plane.block == (256, 1, 1) and plane.shared_mem == 0  # 5 groups of 49 bins
    assert plane.grid == (3, math.ceil(64 / plane.value("channels_per_block")), 1)
    last = torch.ones(2, 64, 10, 10).contiguous(memory_format=torch.channels_last)
    aligned = _problem(last, needs_argmax=False)
    cvec = planning.plan_forward(aligned, out, None, sizes(1))
    assert cvec.name == "roi_pool_forward_cvec<float, float, false>"
    # 8 threads of 8 channels per bin give 3 x 1 blocks, fewer than 8 per SM: halved twice.
    assert cvec.block == (256, 1, 1) and cvec.grid == (3, 4, 1)
    assert cvec.value("channels_per_block") == 16
    assert cvec.shared_mem == 0 and cvec.value("argmax") == 0
    assert planning.plan_forward(aligned, out, None, sizes(132)).value("channels_per_block") == 8
    wide = _problem(torch.ones(2, 1000, 3, 3).to(memory_format=torch.channels_last), None, 7)
    out_wide, _ = _outputs(wide)
    assert planning.plan_forward(wide, out_wide, None, sizes(1)).value("channels_per_block") == 64
    shifted = torch.empty(2 * 64 * 10 * 10 + 1)[1:].as_strided(last.shape, last.stride())
    unaligned = _problem(shifted, needs_argmax=False)
    chan = planning.plan_forward(unaligned, out, None, sizes(132))
    assert chan.name == "roi_pool_forward_chan<float, float, false>"
    assert chan.block == (32, 8, 1) and chan.grid == (3, 2, 1) and chan.value("argmax") == 0
    assert chan.shared_mem == 8 * 14 and chan.value("cache_edges") == 1
    uncached = planning.plan_forward(
        unaligned, out, None, sizes(132), CupyTuning(max_cached_edges=13)
    )
    assert uncached.shared_mem == 0 and uncached.value("cache_edges") == 0
    assert [planning.plane_threads(nb) for nb in (1, 49, 100, 196, 256, 257, 4000)] == [
        256, 256, 224, 224, 256, 256, 256,
    ]  # fmt: skip


def test_empty_outputs_launch_only_to_record_bad_rois():
    x = torch.ones(2, 64, 10, 10)
    empty = _problem(x, torch.zeros(0, 5))
    assert planning.plan_forward(empty, torch.empty(0, 64, 7, 7), None, sizes(132)) is None
    log = torch.zeros(12, dtype=torch.int64)
    no_channels = _problem(torch.ones(2, 0, 10, 10), log=log)
    out = torch.empty(no_channels.output_shape)
    assert planning.plan_forward(_problem(torch.ones(2, 0, 10, 10)), out, None, sizes(1)) is None
    launch = planning.plan_forward(no_channels, out, None, sizes(1))
    assert launch.grid == (3, 1, 1) and launch.value("bad_roi_log") == log.data_ptr()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_plans_name_every_tensor_argument(layout):
    """The launcher swaps tensors by argument name: the names it uses exist, and no other
    argument holds one of the tensors' pointers."""
    from roi_ops_cupy.launch import BACKWARD_TENSORS, FORWARD_TENSORS, PLANES_GROUPED_TENSORS

    x = place_input(torch.randn(2, 20, 9, 11), layout, "cpu")
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 7.0]] * 3)
    log = torch.zeros(12, dtype=torch.int64)
    problem = _problem(x, rois, 3, log=log)
    out, arg = _outputs(problem)
    plan = planning.plan_forward(problem, out, arg, sizes(132, 50 * 2**20))
    tensors = (x, rois, out, arg, log)
    assert [plan.value(n) for n in FORWARD_TENSORS] == [t.data_ptr() for t in tensors]
    named = {plan.position(n) for n in FORWARD_TENSORS}
    pointers = {t.data_ptr() for t in tensors}
    assert not any(v.item() in pointers for i, (_, v) in enumerate(plan.args) if i not in named)
    grad = torch.randn(3, 20, 3, 3)
    groups = torch.zeros(planning.group_rois_size(3, 1, 2), dtype=torch.int32)
    for kernel in kernels.BACKWARD_KERNELS:
        grad_input = torch.zeros(2, 20, 9, 11)
        launch = planning.plan_backward(
            grad, arg, rois, grad_input, kernel, sizes(132, 0, OPTIN), groups=groups
        )
        names, tensors = BACKWARD_TENSORS, (grad, arg, rois, grad_input)
        if kernel == kernels.BACKWARD_PLANES_GROUPED:
            names, tensors = PLANES_GROUPED_TENSORS, (grad, arg, groups, grad_input)
        assert [launch.value(n) for n in names] == [t.data_ptr() for t in tensors]
    with pytest.raises(KeyError, match="has no argument 'nothing'"):
        plan.position("nothing")


def test_backward_kernel_choice():
    choose = planning.backward_kernel
    planes, atomic = kernels.BACKWARD_PLANES, kernels.BACKWARD_ATOMIC
    grouped = kernels.BACKWARD_PLANES_GROUPED
    h200 = sizes(132, 50 * 2**20, OPTIN)
    assert choose((2, 1024, 38, 63), torch.float32, (512, 1024, 7, 7), h200) == planes
    assert choose((2, 1024, 38, 63), torch.float16, (512, 1024, 14, 14), h200) == planes
    assert choose((8, 256, 50, 68), torch.float32, (4096, 256, 14, 14), h200) == planes  # 8.4 M
    # 4,096 blocks scanning 16,000 ROIs each (65 M checks): each image's ROIs listed first
    assert choose((16, 256, 100, 136), torch.float32, (16000, 256, 7, 7), h200) == grouped
    never = CupyTuning(planes_group_min_checks=2**62)
    assert choose((16, 256, 100, 136), torch.float32, (16000, 256, 7, 7), h200, never) == planes
    # a 200 x 272 float32 plane (218 KB) fits: one block of 1024 threads per SM, listed ROIs
    assert choose((8, 256, 200, 272), torch.float32, (4096, 256, 7, 7), h200) == grouped
    assert planning.groups_rois_first(2048, 4096, 1024)
    assert not planning.groups_rois_first(2048, 4096, 256)
    assert planning.groups_rois_first(4096, 4096, 256)  # 2^24 checks
    small = sizes(132, 50 * 2**20, 99 * 1024)
    assert choose((8, 256, 200, 272), torch.float32, (4096, 256, 7, 7), small) == atomic
    # few planes: the atomic kernel, unless the gradient is small enough for one launch to win
    assert choose((4, 64, 100, 136), torch.float32, (32000, 64, 3, 3), h200) == atomic
    assert choose((4, 64, 100, 136), torch.float16, (32000, 64, 3, 3), h200) == atomic  # 14 MB
    assert choose((1, 16, 38, 63), torch.float32, (512, 16, 7, 7), h200) == planes
    assert choose((2, 256, 50, 68), torch.float32, (64, 256, 7, 7), h200) == planes
    no_small = CupyTuning(planes_small_gradient_bytes=0)
    assert choose((1, 16, 38, 63), torch.float32, (512, 16, 7, 7), h200, no_small) == atomic
    assert choose((2, 1024, 38, 63), torch.float32, (0, 1024, 7, 7), h200) == atomic
    assert choose((2, 1024, 38, 63), torch.float32, (5, 1024, 0, 7), h200) == atomic
    old = sizes(132, 50 * 2**20, 48 * 1024)
    assert choose((2, 1024, 80, 80), torch.float64, (9, 1024, 7, 7), old) == atomic
    forced_atomic = CupyTuning(backward_kernel=atomic)
    assert (
        choose((2, 1024, 38, 63), torch.float32, (512, 1024, 7, 7), h200, forced_atomic) == atomic
    )
    forced = CupyTuning(backward_kernel=planes)
    assert choose((1, 16, 38, 63), torch.float32, (512, 16, 7, 7), h200, forced) == planes
    assert choose((8, 256, 200, 272), torch.float32, (4096, 256, 7, 7), h200, forced) == planes
    assert choose((2, 1, 300, 300), torch.float32, (5, 1, 7, 7), h200, forced) == atomic  # no fit
    forced = CupyTuning(backward_kernel=grouped)
    assert choose((1, 16, 38, 63), torch.float32, (512, 16, 7, 7), h200, forced) == grouped
    assert choose((2, 1, 300, 300), torch.float32, (5, 1, 7, 7), h200, forced) == atomic


def test_channels_last_gradient_while_it_fits_in_l2():
    assert planning.channels_last_gradient(28 * 2**20, 50 * 2**20)
    assert not planning.channels_last_gradient(445 * 2**20, 50 * 2**20)
    assert planning.channels_last_gradient(2, 1, CupyTuning(channels_last_gradient=True))
    assert not planning.channels_last_gradient(1, 2, CupyTuning(channels_last_gradient=False))


def test_backward_plans_size_blocks_and_shared_memory():
    grad_output = torch.randn(600, 20, 7, 7)
    argmax = torch.zeros(600, 20, 7, 7, dtype=torch.int32)
    rois = torch.zeros(600, 5)
    grad_input = torch.zeros(3, 20, 30, 40)
    planes = planning.plan_backward(
        grad_output, argmax, rois, grad_input, kernels.BACKWARD_PLANES, sizes(132, 0, OPTIN)
    )
    assert planes.name == "roi_pool_backward_planes<float, float, 256>"
    assert planes.grid == (3 * 20, 1, 1) and planes.block == (256, 1, 1)
    assert planes.shared_mem == 49 * 8 + 30 * 40 * 4
    assert planes.value("channels_per_block") == 1 and planes.value("K") == 600
    assert planes.value("N") == 3 and planes.value("rs0") == 5
    strides = [planes.value(n) for n in ("gi_image", "gi_channel", "gi_pixel")]
    assert strides == [20 * 30 * 40, 30 * 40, 1]
    last = grad_input.contiguous(memory_format=torch.channels_last)
    in_last = planning.plan_backward(
        grad_output, argmax, rois, last, kernels.BACKWARD_ATOMIC, sizes(132)
    )
    strides = [in_last.value(n) for n in ("gi_image", "gi_channel", "gi_pixel")]
    assert strides == [20 * 30 * 40, 1, 20]
    with pytest.raises(ValueError, match="grad_input's H stride must be W times its W stride"):
        planning.plan_backward(
            grad_output, argmax, rois, grad_input[:, :, ::2], kernels.BACKWARD_ATOMIC, sizes(1)
        )
    half = planning.plan_backward(
        grad_output.half(), argmax, rois, grad_input.half(), kernels.BACKWARD_PLANES,
        sizes(132, 0, OPTIN),
    )  # fmt: skip
    assert half.name == "roi_pool_backward_planes<roi_half, float, 256>"
    assert half.shared_mem == planes.shared_mem  # float32 accumulators
    # 1024 threads when the block leaves no room for a second one on the SM
    alone = planning.plan_backward(
        grad_output, argmax, rois, grad_input, kernels.BACKWARD_PLANES, sizes(132, 0, 8 * 1024)
    )
    assert alone.name == "roi_pool_backward_planes<float, float, 1024>"
    assert alone.block == (1024, 1, 1)
    assert planning.planes_threads(218 * 1024, OPTIN) == 1024
    assert planning.planes_threads(55 * 1024, OPTIN) == 256
    assert planning.planes_threads(1024, OPTIN, CupyTuning(planes_threads=1024)) == 1024
    # The atomic kernel: small channel blocks when grad_input does not fit in L2.
    atomic = kernels.BACKWARD_ATOMIC
    cached = planning.plan_backward(grad_output, argmax, rois, grad_input, atomic, sizes(1, 2**30))
    streamed = planning.plan_backward(
        grad_output, argmax, rois, grad_input, atomic, sizes(1, 2**10)
    )
    assert streamed.value("channels_per_block") == 512 // 49
    assert cached.value("channels_per_block") == min(20, 2048 // 49)
    assert cached.grid == (600, 1, 1) and streamed.grid == (600, 2, 1)
    empty = torch.zeros(0, 20, 7, 7, dtype=torch.int32)
    assert (
        planning.plan_backward(grad_output[:0], empty, rois[:0], grad_input, atomic, sizes(1))
        is None
    )
    with pytest.raises(ValueError, match="at least one ROI"):
        planning.plan_backward(
            grad_output[:0], empty, rois[:0], grad_input, kernels.BACKWARD_PLANES, sizes(1)
        )
    # The grouped planes kernel reads the grouping's buffer instead of the rois.
    groups = torch.zeros(planning.group_rois_size(600, 1, 3), dtype=torch.int32)
    grouped = planning.plan_backward(
        grad_output, argmax, rois, grad_input, kernels.BACKWARD_PLANES_GROUPED,
        sizes(132, 0, OPTIN), groups=groups,
    )  # fmt: skip
    assert grouped.name == "roi_pool_backward_planes_grouped<float, 256>"
    assert grouped.grid == planes.grid and grouped.shared_mem == planes.shared_mem
    assert grouped.value("groups") == groups.data_ptr() and grouped.value("K") == 600
    with pytest.raises(KeyError):
        grouped.position("rois")
    with pytest.raises(ValueError, match="groups: the grouped planes backward"):
        planning.plan_backward(
            grad_output, argmax, rois, grad_input, kernels.BACKWARD_PLANES_GROUPED, sizes(1)
        )
    grouping = planning.plan_group_rois(rois, None, 1, 3, groups)
    assert grouping.value("levels") == 0 and grouping.value("L") == 1
    # its 3 + 1 counters in shared memory; beyond 32 KiB of them, in the buffer
    assert grouping.value("counts_in_shared") == 1 and grouping.shared_mem == 16
    many = planning.plan_group_rois(rois, None, 1, 8192, groups)
    assert many.value("counts_in_shared") == 0 and many.shared_mem == 0


def test_backward_levels_kernel_and_channels_per_level():
    # fpn-multi: P2 to P5 of an 800 x 1088 batch of 8, 256 channels, 8,000 ROIs of 7 x 7.
    shapes = [(8, 256, 200, 272), (8, 256, 100, 136), (8, 256, 50, 68), (8, 256, 25, 34)]
    h200 = sizes(132, 50 * 2**20, 227 * 1024)
    # Every level's planes fill about one P2 plane's shared memory, while each level keeps at
    # least 132 blocks (P4 and P5 halve to 8 channels).
    assert planning.planes_levels_channels(shapes, h200, DEFAULT_TUNING) == (1, 4, 8, 8)
    argmax_shape = (8000, 256, 7, 7)
    choose = planning.backward_levels_kernel
    assert choose(shapes, torch.float32, argmax_shape, h200) == kernels.BACKWARD_PLANES_LEVELS
    assert choose(shapes, torch.float16, argmax_shape, h200) == kernels.BACKWARD_PLANES_LEVELS
    # float64 planes of P2 (435 KB) do not fit in an SM's shared memory; no ROIs add nothing.
    assert choose(shapes, torch.float64, argmax_shape, h200) == kernels.BACKWARD_ATOMIC_LEVELS
    assert choose(shapes, torch.float32, (0, 256, 7, 7), h200) == kernels.BACKWARD_ATOMIC_LEVELS
    # Too few blocks for the GPU, unless forced; forcing the atomic kernel.
    few = [(1, 4, 20, 20), (1, 4, 10, 10)]
    assert choose(few, torch.float32, (9, 4, 2, 2), h200) == kernels.BACKWARD_ATOMIC_LEVELS
    forced = CupyTuning(backward_kernel=kernels.BACKWARD_PLANES)
    assert choose(few, torch.float32, (9, 4, 2, 2), h200, forced) == kernels.BACKWARD_PLANES_LEVELS
    atomic = CupyTuning(backward_kernel=kernels.BACKWARD_ATOMIC)
    assert choose(shapes, torch.float32, argmax_shape, h200, atomic) == (
        kernels.BACKWARD_ATOMIC_LEVELS
    )


def test_planes_levels_plan_orders_levels_coarsest_first():
    grads = [torch.empty(2, 6, 8, 8, device="meta"), torch.empty(2, 6, 4, 4, device="meta")]
    grad = torch.empty(3, 6, 2, 2, device="meta")
    levels = torch.zeros(3, dtype=torch.int64, device="meta")
    groups = torch.empty(planning.group_rois_size(3, 2, 2), dtype=torch.int32, device="meta")
    launch = planning.plan_backward_levels(
        grad, grad.int(), torch.empty(3, 5, device="meta"), levels, grads, sizes(1),
        kernel=kernels.BACKWARD_PLANES_LEVELS, groups=groups,
    )  # fmt: skip
    assert launch.name == "roi_pool_backward_planes_levels<float, float, 256>"
    # Level 1 (4 x 4) takes 4 channels a block (one 8 x 8 plane's room): 2 images x 2 blocks,
    # first; level 0 then has 2 images x 6 channels.
    assert (launch.value("channels_per_block1"), launch.value("first_block1")) == (4, 0)
    assert (launch.value("channels_per_block0"), launch.value("first_block0")) == (1, 4)
    assert launch.grid == (16, 1, 1)
    assert launch.shared_mem == planning.planes_shared(64 * 4, 4)


def _stages(x, bins, device, tuning=DEFAULT_TUNING, num_rois=32000, argmax=True):
    side = math.isqrt(bins)
    rois = torch.empty(num_rois, 5, device="meta")
    problem = RoIPoolProblem(x, rois, side, bins // side, 1 / 8, argmax)
    return planning.stages_channels_last(problem, device, tuning)


def test_small_rois_stage_a_channels_last_copy_where_it_fits_in_l2():
    h200 = sizes(132, 50 * 2**20, 227 * 1024)
    x = torch.empty(4, 64, 100, 136, device="meta")  # many-small: 14 MB
    assert _stages(x, 9, h200) is True
    # 3,136 outputs a ROI, 29 outputs an input element: the copy kernel's regime
    assert _stages(x, 49, h200, argmax=False) is True
    assert not _stages(x, 9, sizes(132, 8 * 2**20))  # beyond L2
    assert not _stages(x[:, :8], 9, h200)  # too few channels for lanes
    assert not _stages(x.half()[:, :20], 9, h200)  # 40-byte vectors
    assert not _stages(x.contiguous(memory_format=torch.channels_last), 9, h200)
    assert not _stages(x[..., ::2], 9, h200)  # no unit W stride
    off = replace(DEFAULT_TUNING, stage_channels_last=False)
    assert not _stages(x, 9, h200, off)
    forced = replace(DEFAULT_TUNING, forward_kernel=kernels.FORWARD_SMALL)
    assert not _stages(x, 9, h200, forced)
    # Forced on: wherever the copy can feed the channel-vector kernels, whatever the regime.
    on = replace(DEFAULT_TUNING, stage_channels_last=True)
    assert _stages(x, 49, sizes(132, 8 * 2**20), on, num_rois=1) is True
    assert not _stages(x.half()[:, :20], 9, h200, on)
    assert not _stages(x[..., ::2], 9, h200, on)
    # An image of 2^31 elements: beyond the copy kernel's 32-bit offsets.
    huge = torch.empty(1, 256, 2**12, 2**11, device="meta")
    assert not planning.copy_fits_int32(huge)
    assert planning.copy_fits_int32(huge[:, :, :, : 2**11 - 1])
    assert not _stages(huge, 49, h200, on, num_rois=1)


def test_many_reads_stage_beyond_l2_and_16_bit_inference():
    h200 = sizes(132, 50 * 2**20, 227 * 1024)
    big = torch.empty(16, 256, 100, 136, device="meta")  # big-batch: 223 MB, 3.6 outputs each
    assert _stages(big, 49, h200, num_rois=16000) is True
    assert _stages(big.half(), 49, h200, num_rois=16000)
    assert not _stages(big, 49, h200, num_rois=4000)  # 0.9 outputs an element
    p4 = torch.empty(8, 256, 50, 68, device="meta")  # fpn-p4: 28 MB, in L2, 7.3 outputs each
    # 16 and 32 bits in L2: staged in every mode and for any bins; float64 in L2 not.
    for x in (p4, p4.half(), p4.bfloat16()):
        for bins in (49, 196):
            for argmax in (True, False):
                assert _stages(x, bins, h200, num_rois=4096, argmax=argmax) is True
    assert not _stages(p4.double()[:4], 49, h200, num_rois=4096)
    assert not _stages(p4.double()[:4], 49, h200, num_rois=4096, argmax=False)
    p2 = torch.empty(8, 256, 200, 272, device="meta")  # fpn-p2: 0.46 outputs an element
    # Beyond L2, 16-bit inputs are staged from 0.4 outputs an element, float32 from 2.
    for x in (p2.half(), p2.bfloat16()):
        for argmax in (True, False):
            assert _stages(x, 49, h200, num_rois=4096, argmax=argmax) is True
        assert not _stages(x, 49, h200, num_rois=3072)  # 0.35 outputs an element
    assert not _stages(p2, 49, h200, num_rois=4096, argmax=False)
    assert not _stages(big.half(), 49, h200, num_rois=1000)  # 0.22 outputs an element
    fewer = replace(DEFAULT_TUNING, stage_min_reads=0.25)
    assert _stages(p2, 49, h200, fewer, num_rois=4096, argmax=False)
    later = replace(DEFAULT_TUNING, stage_min_reads_16bit_beyond_l2=0.5)
    assert not _stages(p2.half(), 49, h200, later, num_rois=4096, argmax=False)


def _fpn_multi(dtype=torch.float32, num_rois=8000):
    """fpn-multi's levels (P2 to P5 of 800 x 1088, N = 8, C = 256) on the meta device."""
    shapes = [(200, 272), (100, 136), (50, 68), (25, 34)]
    features = [torch.empty(8, 256, h, w, dtype=dtype, device="meta") for h, w in shapes]
    rois = torch.empty(num_rois, 5, device="meta")
    levels = torch.empty(num_rois, dtype=torch.int64, device="meta")
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    return MultiScaleRoIPoolProblem(features, rois, levels, 7, 7, scales, True)


def test_nchw_pyramids_stage_as_one_map():
    h100 = sizes(132, 50 * 2**20, 227 * 1024)
    # fpn-multi: 100 M outputs from 148 M elements (0.68 an element), beyond L2: 16-bit levels
    # are staged (from 0.4), float32 ones not (from 2).
    for dtype in (torch.float16, torch.bfloat16):
        assert planning.stages_pyramid(_fpn_multi(dtype), h100) is True
        assert not planning.stages_pyramid(_fpn_multi(dtype, num_rois=4000), h100)  # 0.34
    assert not planning.stages_pyramid(_fpn_multi(), h100)
    fewer = replace(DEFAULT_TUNING, stage_min_reads=0.5)
    assert planning.stages_pyramid(_fpn_multi(), h100, fewer)
    # In L2 (here a 1 GB one): 16 and 32 bits from stage_min_reads outputs an element.
    l2 = sizes(132, 2**30, 227 * 1024)
    assert not planning.stages_pyramid(_fpn_multi(torch.float16), l2)
    assert planning.stages_pyramid(_fpn_multi(torch.float16, num_rois=24000), l2)
    on = replace(DEFAULT_TUNING, stage_channels_last=True)
    assert planning.stages_pyramid(_fpn_multi(num_rois=1), h100, on)
    for never in (
        replace(DEFAULT_TUNING, stage_channels_last=False),
        replace(DEFAULT_TUNING, forward_kernel=kernels.FORWARD_UNIT),
        replace(DEFAULT_TUNING, small_roi_outputs=2**20),  # the small kernel's regime
    ):
        assert not planning.stages_pyramid(_fpn_multi(torch.float16), h100, never)
    problem = _fpn_multi(torch.float16)
    for levels in (
        [x.contiguous(memory_format=torch.channels_last) for x in problem.features],
        [x[:, :20] for x in problem.features],  # 40-byte channel vectors
        [*problem.features[:3], problem.features[3][:, :, :0]],  # an empty level
        [*problem.features[:3], problem.features[3][..., ::2]],  # no unit W stride
    ):
        other = MultiScaleRoIPoolProblem(levels, problem.rois, problem.levels, 7, 7, (1,) * 4, True)
        assert not planning.stages_pyramid(other, h100, on)


def test_tables_of_maxima_in_cvec_inference_of_dense_channels_last_maps():
    """`uses_max_tables`: inference on the cvec kernels (float32, float16, bfloat16), the map
    dense channels_last and beyond L2, a device with max.NaN, enough outputs; the plans of the
    count and the build; the cvec plans pass the tables (null unless given), and no other kernel
    takes them."""
    x = torch.ones(2, 64, 40, 40).contiguous(memory_format=torch.channels_last)  # 819,200 B
    rois = torch.tensor([[0, 0.0, 0.0, 39.0, 39.0]] * 300)
    l2 = sizes(132, 2**19)
    inference = _problem(x, rois, 7, needs_argmax=False)  # 300 * 64 * 49 outputs: 940,800
    few = CupyTuning(table_min_outputs=900_000)
    assert planning.uses_max_tables(inference, False, l2, True, few)  # the rule, by default
    assert not planning.uses_max_tables(inference, False, sizes(132, 2**20), True, few)  # in L2
    assert not planning.uses_max_tables(inference, False, l2, True)  # fewer than 2^22 outputs
    assert not planning.uses_max_tables(inference, True, l2, True, few)  # the argmax
    assert not planning.uses_max_tables(inference, False, l2, False, few)  # no max.NaN
    off = CupyTuning(max_tables=False, table_min_outputs=0)
    assert not planning.uses_max_tables(inference, False, l2, True, off)
    forced = CupyTuning(max_tables=True)
    assert planning.uses_max_tables(inference, False, sizes(132, 50 * 2**20), True, forced)
    over = 2 * x.numel() * 4 - 1
    small = CupyTuning(table_min_outputs=0, table_max_bytes=over)
    assert not planning.uses_max_tables(inference, False, l2, True, small)
    for other in (x.double(), x[:, :, :, :39], x.contiguous()):  # float64, not dense, NCHW
        problem = _problem(other, rois, 7, needs_argmax=False)
        assert not planning.uses_max_tables(problem, False, l2, True, forced)
    for dtype in (torch.float16, torch.bfloat16):
        problem = _problem(x.to(dtype), rois.to(torch.float32), 7, needs_argmax=False)
        assert planning.uses_max_tables(problem, False, sizes(132, 2**18), True, few)
    head = planning.TABLE_HEAD_BYTES
    assert head % 16 == 0 and head >= 16 + 8 * kernels.TABLE_SAVINGS_BLOCKS
    assert planning.table_buffer_elements(x) == head // 4 + 2 * x.numel()
    assert planning.table_buffer_elements(x.half()) == head // 2 + 2 * x.numel()
    decision = torch.zeros(head // 4, dtype=torch.int32)
    tables = torch.zeros(2 * x.numel())
    plan = planning.plan_table_savings(inference, decision)
    assert plan.name == "roi_ops_table_savings<float>" and plan.grid == (2, 1, 1)  # 300 ROIs
    assert plan.block == (kernels.TABLE_SAVINGS_THREADS, 1, 1)
    assert plan.value("decision") == decision.data_ptr()
    assert [planning.table_savings_blocks(k) for k in (0, 1, 256, 257, 10**6)] == [1, 1, 1, 2, 64]
    build = planning.plan_max_tables(inference, decision, tables, l2, few)
    threads = 2 * math.ceil(40 / kernels.TABLE_ROWS) * 40 * (64 // 4)
    assert build.name == "roi_ops_max_tables<float>"
    assert build.grid == (math.ceil(threads / kernels.TABLE_THREADS), 1, 1)
    assert build.value("counts") == 2
    assert build.value("min_saved_per_position") == few.table_min_saved_reads
    assert (
        planning.plan_max_tables(inference, decision, tables, l2, forced).value(
            "min_saved_per_position"
        )
        == 0.0
    )
    few_sms = planning.plan_max_tables(inference, decision, tables, sizes(1))
    assert few_sms.grid == (planning.TABLE_BLOCKS_PER_SM, 1, 1)
    assert build.value("tables") == tables.data_ptr()
    assert build.value("decision") == decision.data_ptr()
    out, _ = _outputs(inference)
    for cached in (l2, sizes(132, 50 * 2**20)):  # the cvec kernel, and its wide twin in L2
        plan = planning.plan_forward(inference, out, None, cached, few, tables, decision)
        assert plan.value("tables") == tables.data_ptr()
        assert plan.value("table_decision") == decision.data_ptr()
    assert plan.name.startswith(kernels.FORWARD_CVEC_WIDE + "<")
    assert planning.plan_forward(inference, out, None, l2).value("tables") == 0
    plane_only = CupyTuning(forward_kernel=kernels.FORWARD_PLANE)
    plane = planning.plan_forward(inference, out, None, l2, plane_only)
    with pytest.raises(KeyError):
        plane.position("tables")
