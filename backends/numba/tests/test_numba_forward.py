"""The numba forward against the scalar reference, bit for bit, by case; serial and parallel."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from numba_cases import (
    DTYPES,
    LAYOUTS,
    check,
    make_backend,
    random_features,
    random_rois,
    run_forward,
)
from numba_cases import layout as to_layout
from roi_ops.testing import reference_roi_pool

pytest.importorskip("numba")


def _with_work(serial_work: int):
    from roi_ops_numba import NumbaBackend
    from roi_ops_numba.tuning import NumbaTuning

    return NumbaBackend(NumbaTuning(serial_work=serial_work))


def test_worked_example(backend):
    h, w = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    x = (10 * h + w).to(torch.float32).view(1, 1, 6, 6)
    rois = torch.tensor([[0, 1.5, 0.5, 10.5, 6.4]])
    output, argmax = check(backend, x, rois, 2, 0.5)
    assert output.view(2, 2).tolist() == [[13, 15], [33, 35]]
    assert argmax.view(2, 2).tolist() == [[9, 11], [21, 23]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", [1 / 16, 0.5])
@pytest.mark.parametrize("ties", [False, True], ids=["randn", "ties"])
def test_random(backend, dtype, layout, scale, ties):
    g = torch.Generator().manual_seed(hash((str(dtype), layout, scale, ties)) % 2**31)
    x = to_layout(random_features((2, 3, 9, 11), dtype, g, ties), layout)
    rois = random_rois(10, 2, 9, 11, scale, g).to(dtype)
    check(backend, x, rois, (3, 4), scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_rois_with_half_input(backend, dtype, layout):
    g = torch.Generator().manual_seed(7)
    x = to_layout(random_features((2, 4, 8, 10), dtype, g, ties=True), layout)
    rois = random_rois(12, 2, 8, 10, 0.5, g).to(torch.float32)
    check(backend, x, rois, (2, 3), 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_rounding_coordinates(backend, dtype):
    """Products landing exactly on .5 round away from zero (C round), not to even."""
    g = torch.Generator().manual_seed(3)
    x = random_features((1, 2, 12, 12), dtype, g)
    coords = [-5.0, -3.0, -1.0, 1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 21.0]  # * 0.5 -> k + .5
    rows = [[0, a, b, c, d] for a in coords[:4] for b, c, d in [(1.0, 9.0, 13.0), (5.0, 21.0, 3.0)]]
    rows += [[0, -2.5, 0.5, 2.5, 4.5], [0, 0.5, 1.5, 6.5, 7.5]]  # scale 1: the .5 is in the value
    rois = torch.tensor(rows, dtype=torch.float64).to(dtype)
    check(backend, x, rois, (2, 3), 0.5)
    check(backend, x, rois, (3, 2), 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_invalid_rois(backend, dtype, layout):
    """Bad batch indices and non-finite values give zeros and -1; trunc() picks the image."""
    g = torch.Generator().manual_seed(11)
    x = to_layout(random_features((2, 3, 6, 7), dtype, g), layout)
    inf, nan = math.inf, math.nan
    rows = [
        [-1, 0, 0, 5, 5],
        [2, 0, 0, 5, 5],
        [2.5, 0, 0, 5, 5],
        [-0.5, 0, 0, 5, 5],  # trunc -> 0: valid
        [1.9, 1, 1, 4, 4],  # trunc -> 1: valid
        [nan, 0, 0, 5, 5],
        [0, nan, 0, 5, 5],
        [0, 0, inf, 5, 5],
        [1, 0, 0, -inf, 5],
        [0, 0, 0, 5, nan],
        [1, 0, 0, 6, 5],
    ]
    rois = torch.tensor(rows, dtype=torch.float64).to(dtype)
    output, argmax = check(backend, x, rois, (2, 2), 1.0)
    invalid = [0, 1, 2, 5, 6, 7, 8, 9]
    assert (argmax[invalid] == -1).all() and (output[invalid] == 0).all()
    assert (argmax[[3, 4, 10]] >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_off_map_and_inverted(backend, dtype):
    g = torch.Generator().manual_seed(5)
    x = random_features((1, 2, 8, 8), dtype, g)
    rows = [
        [0, -40, -40, -20, -20],  # entirely above-left: all bins empty
        [0, 20, 20, 40, 40],  # entirely below-right
        [0, -4, -4, 3, 3],  # partly off
        [0, 6, 6, 2, 2],  # inverted: one pixel wide
        [0, 5, 2, 5, 2],  # a single pixel
        [0, 7, 0, 12, 7],  # off the right edge
    ]
    rois = torch.tensor(rows, dtype=torch.float64).to(dtype)
    output, argmax = check(backend, x, rois, (3, 3), 1.0)
    assert (argmax[0] == -1).all() and (argmax[1] == -1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_and_inf_features(backend, dtype, layout):
    g = torch.Generator().manual_seed(2)
    x = random_features((1, 3, 6, 6), dtype, g, ties=True).clone()
    x[0, 0, 1, 2] = math.nan
    x[0, 0, 1, 4] = -math.nan  # a NaN with the sign bit set is still the maximum
    x[0, 0, 4, 4] = math.inf
    x[0, 1] = -math.inf  # a plane of only -inf
    x[0, 1, 5, 5] = math.nan
    x[0, 2, :3, :3] = -0.0  # -0.0 and +0.0 are equal: the first scanned wins
    x[0, 2, 1, 1] = 0.0
    x = to_layout(x, layout)
    rois = torch.tensor([[0, 0, 0, 5, 5], [0, 1, 1, 4, 4], [0, 0, 0, 2, 2], [0, 2, 1, 2, 1]])
    output, argmax = check(backend, x, rois.to(dtype), (2, 3), 1.0)
    assert output[0, 0].isnan().any() and (output[0, 1] == -math.inf).any()


def test_float_bin_edge(backend):
    """float32, roi height 57, PH 7: the last bin ends at row 58, one past 57 * 7 / 7."""
    rows = torch.arange(64, dtype=torch.float32).view(1, 1, 64, 1).expand(1, 2, 64, 3)
    x = rows.contiguous()
    rois = torch.tensor([[0, 0, 0, 2, 56]], dtype=torch.float32)
    output, argmax = check(backend, x, rois, (7, 1), 1.0)
    assert output[0, 0, 6, 0].item() == 57.0  # row 57 is in the last bin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_coordinates(backend, dtype):
    big = 6.0e4 if dtype == torch.float16 else 1e30
    g = torch.Generator().manual_seed(13)
    x = random_features((1, 2, 5, 6), dtype, g)
    rows = [
        [0, -big, -big, big, big],
        [0, 0, 0, big, big],
        [0, -big, 0, 0, 4],
        [0, big, big, -big, -big],
    ]
    rois = torch.tensor(rows, dtype=torch.float64).to(dtype)
    check(backend, x, rois, (2, 2), 1.0)
    check(backend, x, rois, (2, 3), 2.0)  # float16: 6e4 * 2 overflows to inf, then saturates


def test_float16_geometry_is_half_precision(backend):
    """float16 rois round every product and quotient to half: pooled sizes that are not exact."""
    g = torch.Generator().manual_seed(17)
    x = random_features((1, 1, 40, 40), torch.float16, g)
    rows = [[0, 0, 0, 36, 38], [0, 1, 3, 35, 37], [0, 0.7, 0.3, 39.4, 33.3]]
    rois = torch.tensor(rows, dtype=torch.float16)
    check(backend, x, rois, (7, 9), 1.0)
    check(backend, x, rois, (13, 11), 1 / 3)


def test_float16_geometry_overflow(backend):
    """float16: G(PW) = inf for PW >= 65520 (bin width 0, or NaN with an infinite ROI width)."""
    g = torch.Generator().manual_seed(47)
    x = random_features((1, 1, 3, 5), torch.float16, g)
    rows = [[0, 0, 0, 4, 2], [0, 0, 0, 65504, 2], [0, -65504, 0, 65504, 2]]
    rois = torch.tensor(rows, dtype=torch.float16)
    check(backend, x, rois, (2, 65530), 2.0)


def test_float16_scale_goes_through_float32(backend):
    """G(scale) for float16 rois is half(float32(scale)): here 1.0, where half(scale) is not."""
    scale = 1 + 2**-11 + 2**-30  # float32 drops 2**-30, leaving a half-way tie that goes to 1.0
    g = torch.Generator().manual_seed(41)
    x = random_features((1, 1, 8, 1100), torch.float16, g)
    rois = torch.tensor([[0, 1000, 0, 1040, 7], [0, 1001, 1, 1019, 5]], dtype=torch.float16)
    check(backend, x, rois, (1, 8), scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views(backend, dtype):
    """A channel slice with a storage offset and a transposed (W, H) view are read in place."""
    g = torch.Generator().manual_seed(19)
    base = random_features((3, 6, 7, 9), dtype, g)
    rois = random_rois(8, 2, 7, 9, 1.0, g).to(dtype)
    check(backend, base[1:, 1::2], rois, (2, 3), 1.0)
    check(backend, base.transpose(2, 3)[:2], random_rois(8, 2, 9, 7, 1.0, g).to(dtype), 2, 1.0)


@pytest.mark.parametrize(
    "stage_bytes", [0, 200, 600, None], ids=["gather", "band", "mixed", "window"]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_staging_paths(schedule, stage_bytes, dtype):
    """NCHW tasks stage their ROI window or bin-row band channels-last, or gather in place."""
    backend = (
        make_backend(schedule)
        if stage_bytes is None
        else make_backend(schedule, stage_bytes=stage_bytes)
    )
    g = torch.Generator().manual_seed(43)
    x = random_features((2, 3, 12, 13), dtype, g, ties=True)
    rois = random_rois(12, 2, 12, 13, 1.0, g).to(dtype)
    check(backend, x, rois, (3, 2), 1.0)
    check(backend, x[:, :, 1:, 2:], rois, (2, 3), 1.0)  # strided rows, storage offset


@pytest.mark.parametrize("coverage", [0.0, math.inf], ids=["grouped", "per-roi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_float_paths(schedule, coverage, dtype):
    """float32/float64 NCHW: staged per group of ROIs and channel block, or per ROI."""
    backend = make_backend(schedule, stage_min_coverage=coverage)
    g = torch.Generator().manual_seed(47)
    x = random_features((3, 21, 14, 17), dtype, g, ties=True)
    flat = x.view(-1)
    for value in (math.nan, -0.0, math.inf, -math.inf, math.nan):
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = value
    rois = random_rois(16, 3, 14, 17, 0.5, g)
    rois[:5, 1:] = rois[:5, 1:] / 4 + 10  # small boxes away from (0, 0): regions with offsets
    rois[5, 0] = 2.0  # image 2 holds one ROI only
    check(backend, x, rois.to(dtype), (3, 2), 0.5)
    check(backend, x[:, 2::3, 1:, 3:], rois.to(dtype), (2, 3), 0.5)  # strides, storage offset
    check(backend, x[1:, :, :, :1], rois[rois[:, 0] < 2].to(dtype), 2, 0.5)  # W = 1


def test_zero_rois(backend):
    x = torch.rand(2, 3, 5, 5)
    output, argmax = run_forward(backend, x, torch.zeros(0, 5), (2, 2), 1.0)
    assert output.shape == (0, 3, 2, 2) and argmax.shape == (0, 3, 2, 2)


@pytest.mark.parametrize("shape", [(0, 2, 4, 4), (1, 2, 0, 4), (1, 2, 4, 0), (1, 0, 4, 4)])
def test_empty_input(backend, shape):
    rois = torch.tensor([[0, 0, 0, 3, 3], [0, 1, 1, 2, 2]], dtype=torch.float32)
    check(backend, torch.ones(shape), rois, (2, 2), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16], ids=str)
def test_stage(dtype):
    """The channels-last staging copy, against torch: blocks of 16 planes and the planes left
    (two blocks of 16 channels and 4 more; 17 from channel 3), a non-unit W stride and a
    storage offset. int16 is how float16 and bfloat16 are staged (as raw bits)."""
    from roi_ops_numba.memory import flat_storage
    from roi_ops_numba.staging import _stage

    g = torch.Generator().manual_seed(3)
    base = (torch.randn(2, 36, 7, 41, generator=g) * 1000).to(dtype)
    views = {"nchw": base, "strided": base[:, :, :, ::2], "offset": base[:, 2:, 1:, 3:]}
    for name, x in views.items():
        _, channels, height, width = x.shape
        s_n, s_c, s_h, s_w = x.stride()
        src = flat_storage(x)  # starts at x's first element
        for y0, y1, x0, x1 in ((0, height, 0, width), (1, height - 1, 2, width - 1), (2, 3, 5, 6)):
            for c0, nc in ((0, channels), (3, 17)):
                dst = torch.full(((y1 - y0) * (x1 - x0) * nc,), 12345, dtype=dtype)  # poison
                plane0 = s_n + c0 * s_c  # image 1, channel c0
                _stage(src, plane0, s_c, s_h, s_w, nc, y0, y1, x0, x1, dst.numpy())
                expected = x[1, c0 : c0 + nc, y0:y1, x0:x1].permute(1, 2, 0).reshape(-1)
                assert torch.equal(dst, expected), (name, (y0, y1, x0, x1), (c0, nc))


@pytest.mark.parametrize(
    "min_block, task_bytes, tasks_per_thread, max_bytes",
    [
        (1, 0, 1, 2**25),
        (3, 0, 1000, 2**25),
        (64, 16 * 2**20, 8, 2**25),
        (64, 16 * 2**20, 8, 5 * 19 * 23 * 8),
        (64, 16 * 2**20, 8, 100),
    ],
    ids=["one-channel-blocks", "many-groups", "default", "buffer-limit", "per-roi"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_staged_blocks_and_groups(
    schedule, min_block, task_bytes, tasks_per_thread, max_bytes, dtype
):
    """float32/float64 NCHW tasks stage a block of channels of a group of ROIs' region: blocks
    of one channel, ROIs cut into many groups (each restaging its own region), the defaults, a
    buffer limit that allows only a few channels per block, and one that sends every ROI to
    the per-ROI kernel; with invalid ROIs, ROIs past the map and empty bins among them. The
    same groups read channels_last inputs in place."""
    backend = make_backend(
        schedule,
        stage_min_block=min_block,
        stage_max_bytes=max_bytes,
        stage_task_bytes=task_bytes,
        tasks_per_thread=tasks_per_thread,
        stage_min_coverage=0.0,
    )
    g = torch.Generator().manual_seed(53)
    x = random_features((3, 21, 19, 23), dtype, g, ties=True)
    rois = random_rois(40, 3, 19, 23, 0.5, g).to(dtype)
    rois[3, 0] = -1.0  # invalid: every bin empty, never staged
    rois[4, 1:] = torch.tensor([60.0, 50.0, 80.0, 70.0], dtype=dtype)  # past the map: empty bins
    rois[5, 0] = 7.0  # batch index out of range
    check(backend, x, rois, (3, 4), 0.5)
    check(backend, x[:, 1::2, 2:, 1:], rois, (2, 2), 0.5)  # strided channels, storage offset
    check(backend, x.contiguous(memory_format=torch.channels_last), rois, (3, 4), 0.5)  # in place


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain-stores", "streamed"])
def test_streamed_outputs(schedule, dtype, layout, stream):
    """Grouped outputs written with non-temporal stores (`stream_min_bytes` 0: float32/float64
    values, float16 and bfloat16 values 16 at a time, every argmax) or plain ones: the same bits, on
    poisoned outputs, with invalid rows, ROIs past the map and groups cut small so that many
    tasks write (and fence) concurrently."""
    backend = make_backend(
        schedule,
        stream_min_bytes=0 if stream else 2**62,
        stage_min_coverage=0.0,
        stage_min_block=1,
        tasks_per_thread=64,
    )
    g = torch.Generator().manual_seed(59)
    x = random_features((2, 37, 15, 18), dtype, g, ties=True)
    flat = x.view(-1)
    for value in (math.nan, -0.0, math.inf, -math.inf):
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = value
    x = to_layout(x, layout)
    rois = random_rois(60, 2, 15, 18, 0.5, g).to(dtype)
    rois[2, 0] = -1.0
    rois[7, 1:] = torch.tensor([50.0, 40.0, 90.0, 80.0], dtype=dtype)
    check(backend, x, rois, (3, 5), 0.5)
    check(backend, x, rois, (1, 1), 0.5)
    # Default blocks: each ROI's outputs long enough for whole aligned runs between its ends.
    default_blocks = make_backend(schedule, stream_min_bytes=0 if stream else 2**62)
    check(default_blocks, x, rois, (3, 5), 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_widening_is_exact_for_every_16_bit_pattern(dtype):
    """The grouped kernels scan float16 and bfloat16 widened to float32: every raw pattern
    widens to its value's float32 bits (NaNs to NaNs) and narrows back to itself."""
    import numpy as np
    from numba import njit

    from roi_ops_numba import staging

    kind = staging.FLOAT16 if dtype == torch.float16 else staging.BFLOAT16

    @njit
    def round_trip(patterns, widened, narrowed, kind):
        for i in range(patterns.shape[0]):
            widened[i] = staging.widen_bits(patterns[i], kind)
            narrowed[i] = staging.narrow_bits(widened[i], kind)

    patterns = np.arange(-(2**15), 2**15, dtype=np.int64).astype(np.int16)
    widened, narrowed = np.empty(2**16, np.int32), np.empty(2**16, np.int16)
    round_trip(patterns, widened, narrowed, kind)
    assert np.array_equal(narrowed, patterns)
    values = torch.from_numpy(patterns).view(dtype).float()
    as_float = torch.from_numpy(widened).view(torch.float32)
    nan = values.isnan()
    assert torch.equal(as_float.isnan(), nan)
    assert torch.equal(as_float[~nan].view(torch.int32), values[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain-stores", "streamed"])
def test_every_16_bit_pattern_pools_to_itself(schedule, dtype, layout, stream):
    """Every float16 / bfloat16 bit pattern (NaN payloads, subnormals, signed zeros and
    infinities) in one map, pooled by the widened grouped kernels, their results narrowed and
    stored plainly or streamed: argmax as the reference's, values as its bit for bit, and a NaN
    result is the bits of the first NaN (the element at the argmax), not a canonical NaN."""
    g = torch.Generator().manual_seed(67)
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    patterns = patterns[torch.randperm(2**16, generator=g)]
    x = to_layout(patterns.view(dtype).view(1, 4, 128, 128), layout)
    rois = random_rois(40, 1, 128, 128, 1.0, g).to(torch.float32)
    backend = make_backend(
        schedule, stage_min_coverage=0.0, stream_min_bytes=0 if stream else 2**62
    )
    output, argmax = run_forward(backend, x, rois, (3, 5), 1.0)
    expected, expected_argmax = reference_roi_pool(x, rois, (3, 5), 1.0)
    assert torch.equal(argmax, expected_argmax)
    bits, expected_bits = output.view(torch.int16), expected.view(torch.int16)
    nan = output.isnan()
    assert torch.equal(nan, expected.isnan())
    assert torch.equal(bits[~nan], expected_bits[~nan])
    assert nan.any()  # the NaN results are checked below
    _, c, _, _ = torch.nonzero(nan, as_tuple=True)
    planes = x.contiguous().view(torch.int16).view(1, 4, -1)
    assert torch.equal(bits[nan], planes[0, c, argmax[nan].long()])


def test_outputs_stream_from_the_threshold(monkeypatch):
    """The grouped kernels stream where the output and argmax together reach
    `stream_min_bytes` (the argmax counted at its own four bytes), and not below it."""
    from roi_ops_numba import pool_groups

    seen = []
    kernel = pool_groups.pool_groups_serial

    def spy(*arguments):
        seen.append(arguments[-4])  # stream (then bits, out_bits, kind)
        return kernel(*arguments)

    monkeypatch.setattr(pool_groups, "pool_groups_serial", spy)
    g = torch.Generator().manual_seed(61)
    x = random_features((1, 4, 9, 9), torch.float64, g)
    rois = random_rois(5, 1, 9, 9, 1.0, g).to(torch.float64)
    output_bytes = 5 * 4 * 2 * 2 * 8  # (5, 4, 2, 2) float64
    for needs_argmax, written in ((True, output_bytes * 3 // 2), (False, output_bytes)):
        for threshold, expected in ((written, True), (written + 1, False)):
            seen.clear()
            backend = make_backend("serial", stream_min_bytes=threshold)
            run_forward(backend, x, rois, (2, 2), 1.0, needs_argmax)
            assert seen == [expected], (needs_argmax, threshold)


def test_stream_store_writes_bits_non_temporally():
    """`stream_store` stores the exact bits of every float (NaN payloads, -0.0) and integer
    dtype the kernels write; on x86-64 the compiled store of a value loaded from memory (as the
    kernels' are) is a non-temporal one (``movnti``), else the outputs would silently take
    plain stores."""
    import platform

    import numpy as np
    from numba import njit

    from roi_ops_numba.streaming import store_fence, stream_store

    @njit
    def copy(src, dst):
        for i in range(src.shape[0]):
            stream_store(dst, i, src[i])
        store_fence()

    payloads = {
        np.float32: np.array([0x7FC00001, 0xFFA00000, 0x80000000, 0x00000001, 0x3F800000]),
        np.float64: np.array([0x7FF8000000000001, 0x8000000000000000, 0x0000000000000001]),
        np.int32: np.array([-(2**31), -1, 0, 2**31 - 1]),
        np.int64: np.array([-(2**63), -1, 0, 2**63 - 1]),
    }
    for dtype, values in payloads.items():
        bits = np.dtype(dtype).str.replace("f", "u").replace("i", "u")
        src = values.astype(bits).view(dtype)
        dst = np.full(src.shape, 7, dtype=dtype)
        copy(src, dst)
        assert dst.view(bits).tolist() == src.view(bits).tolist(), dtype
    if platform.machine() in ("x86_64", "AMD64"):
        for signature in copy.signatures:
            assert "movnt" in copy.inspect_asm(signature), signature


def test_stream_gathered_writes_every_element_once():
    """`stream_gathered` writes ``src[index[o]]`` (exact bits) at every o of its destination and
    nothing around it, whatever the destination's alignment and length (elements before the
    first whole line, whole lines, elements after the last), for each 4- and 8-byte dtype the
    kernels write; on x86-64 the whole lines take aligned non-temporal vector stores."""
    import platform
    import re

    import numpy as np
    from numba import njit

    from roi_ops_numba.streaming import store_fence, stream_gathered

    @njit
    def gathered(dst, src, index):
        stream_gathered(dst, src, index)
        store_fence()

    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64, np.int32, np.int64):
        bits = np.dtype(dtype).str.replace("f", "u").replace("i", "u")
        width = np.dtype(dtype).itemsize * 8
        src = rng.integers(0, 2**width, 300, dtype=bits).view(dtype)  # NaN payloads too
        for size in (0, 1, 7, 16, 17, 40, 97, 300):
            index = rng.permutation(300)[:size].astype(np.int32)
            for start in range(0, 80 // np.dtype(dtype).itemsize + 1):
                storage = np.zeros((size + start + 20 + 64) * 8, np.uint8)
                base = (-storage.ctypes.data) % 64  # 64-aligned, then `start` elements on
                memory = storage[base : base + (size + start + 20) * np.dtype(dtype).itemsize]
                whole = memory.view(bits)
                whole[:] = 0x5A
                dst = whole.view(dtype)[start : start + size]
                gathered(dst, src, index)
                assert whole.view(bits)[start : start + size].tolist() == (
                    src.view(bits)[index].tolist()
                ), (dtype, size, start)
                assert (whole[:start] == 0x5A).all() and (whole[start + size :] == 0x5A).all()
    if platform.machine() in ("x86_64", "AMD64"):
        for signature in gathered.signatures:
            assert re.search(r"movnt(ps|pd|dq)", gathered.inspect_asm(signature)), signature


def test_many_channels_few_rois(backend):
    """Work is split over channel blocks: one ROI, many channels, both layouts."""
    g = torch.Generator().manual_seed(23)
    x = random_features((1, 70, 6, 5), torch.float32, g, ties=True)
    rois = torch.tensor([[0, 0, 0, 4, 5]], dtype=torch.float32)
    for name in LAYOUTS:
        check(backend, to_layout(x, name), rois, (2, 2), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_thread_count_and_schedule_do_not_change_results(dtype):
    """Serial and parallel kernels, and any thread count, give the same bits."""
    g = torch.Generator().manual_seed(29)
    x = random_features((2, 8, 10, 10), dtype, g, ties=True)
    rois = random_rois(20, 2, 10, 10, 1.0, g).to(dtype)
    results = [run_forward(make_backend("serial"), x, rois, (3, 3), 1.0)]
    parallel = make_backend("parallel")
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run_forward(parallel, x, rois, (3, 3), 1.0))
    finally:
        torch.set_num_threads(previous)
    bits = torch.int16 if dtype == torch.float16 else torch.int32
    for output, argmax in results[1:]:
        assert torch.equal(output.view(bits), results[0][0].view(bits))
        assert torch.equal(argmax, results[0][1])


def test_small_calls_run_serially_and_large_ones_in_parallel(monkeypatch):
    """The work estimate picks the kernel: below `serial_work` no parallel kernel runs."""
    from roi_ops_numba import ops, pool_groups, pool_keys

    ops._warm_up(torch.float32)
    calls = []
    for module in (pool_groups, pool_keys):
        for name in dir(module):
            if name.endswith(("_serial", "_parallel")):
                kernel = getattr(module, name)

                def counted(*arguments, kernel=kernel, name=name):
                    calls.append(name.rpartition("_")[2])
                    kernel(*arguments)

                monkeypatch.setattr(module, name, counted)
    g = torch.Generator().manual_seed(31)
    x = random_features((2, 16, 10, 10), torch.float32, g)
    rois = random_rois(8, 2, 10, 10, 1.0, g).to(torch.float32)
    most = 16 * 8 * (10 * 10 + 9)  # channels x ROIs x (map + bins): more than the work
    for serial_work, expected in ((most, "serial"), (1, "parallel")):
        calls.clear()
        check(_with_work(serial_work), x, rois, 3, 1.0)
        assert calls == [expected, expected]


def test_parallel_geometry_matches_serial():
    """The parallel geometry (runs of GEOMETRY_RUN ROIs, the last one short) gives the serial
    one's edges, sources, work estimate and bad-ROI log, invalid rows among them."""
    import numpy as np
    from roi_ops.backend import RoIPoolProblem
    from roi_ops.bad_rois import decode, new_log

    from roi_ops_numba import geometry, ops

    g = torch.Generator().manual_seed(37)
    count = 2 * geometry.GEOMETRY_RUN + 300
    x = random_features((3, 2, 12, 15), torch.float32, g)
    rois = random_rois(count, 3, 12, 15, 0.5, g)
    rois[1100, 0] = 3.0  # batch index out of range: the first invalid row
    rois[1200, 2] = math.nan
    rois[5, 0] = 2.5  # truncated to image 2: valid
    results = []
    for threads in (1, 2):
        log = new_log()
        problem = RoIPoolProblem(x, rois, 3, 4, 0.5, True, bad_roi_log=log)
        bins = ops.BinGeometry(ops.PoolCall(problem), threads)
        arrays = (bins.source, bins.hstart, bins.hend, bins.wstart, bins.wend)
        results.append(([a.copy() for a in arrays], int(bins.work), log.clone()))
    (serial, work, log), (parallel, parallel_work, parallel_log) = results
    for expected, got in zip(serial, parallel, strict=True):
        assert np.array_equal(expected, got)
    assert serial[0][1100] == -1 and serial[0][1200] == -1 and serial[0][5] == 2
    assert work == parallel_work > 0
    assert torch.equal(log, parallel_log)
    assert decode(log).row == 1100


def test_serial_kernel_runs_before_any_parallel_one():
    """A serial kernel called first in a process (no thread pool started yet) stages in its
    own buffer row: nothing may depend on numba's thread id there."""
    code = """
import numpy as np, torch
from roi_ops.backend import RoIPoolProblem
from roi_ops.testing.reference import reference_roi_pool
from roi_ops_numba import ops, pool_groups
from roi_ops_numba.memory import flat_storage
from roi_ops_numba.tuning import DEFAULT_TUNING as t
x = torch.randn(1, 3, 8, 9)
rois = torch.tensor([[0, 0, 0, 8, 7], [0, 1, 2, 5, 6]], dtype=torch.float32)
problem = RoIPoolProblem(x, rois, 2, 2, 1.0, True)
call = ops.PoolCall(problem)
bins = ops.BinGeometry(call, 1)
order, groups, block, size = pool_groups.plan_groups(
    bins.source, *bins.edges(), 8, 3, 4, 1, True, 1, t.min_block, t.max_block,
    t.task_output_bytes, 0.0, t.stage_min_block, t.stage_task_bytes, t.stage_max_bytes)
out = torch.full(problem.output_shape, float("nan"))
argmax = torch.full(problem.output_shape, -7, dtype=torch.int32)
pool_groups.pool_groups_serial(
    flat_storage(x), call.layout, 1, 3, bins.source, order, groups, *bins.edges(),
    out.view(-1).numpy(), argmax.view(-1).numpy(), True, block, np.empty((1, size), np.float32),
    True, np.empty(0, np.int16), np.empty(0, np.int16), 0)
expected, expected_argmax = reference_roi_pool(x, rois, (2, 2), 1.0)
assert torch.equal(out, expected) and torch.equal(argmax, expected_argmax)
"""
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("path", ["_round_half", "_round_half_bits"])
def test_float16_geometry_rounding_is_torchs(path):
    """`geometry._round_half` (float16 ROI geometry: through float32 with F16C) and
    `_round_half_bits` (on float64 bits, the path without F16C): equal to torch's float32 ->
    float16 rounding on every float32 pattern of a random sample, on every float16 value, on the
    midpoints between neighbours (ties to even) and on the float32 values next to them, signed
    zeros, infinities, NaN and overflow included."""
    import numpy as np
    from numba import njit

    from roi_ops_numba import geometry

    round_half = getattr(geometry, path)

    @njit
    def rounded(values, out):
        for i in range(values.shape[0]):
            out[i] = round_half(values[i])

    g = torch.Generator().manual_seed(71)
    sample = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64)
    sample = sample.to(torch.int32).view(torch.float32)
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    ordered = halves[halves.isfinite()].float().unique()
    middles = (ordered[1:] + ordered[:-1]) / 2  # exact in float32
    up, down = torch.nextafter(middles, middles + 1), torch.nextafter(middles, middles - 1)
    around = torch.cat([up, down])
    edges = torch.tensor([65504.0, 65519.996, 65520.0, 2.0**-14, 2.0**-24, 2.0**-25, 0.0, -0.0])
    values = torch.cat([sample, halves.float(), middles, around, edges, -edges])
    out = np.empty(values.numel(), np.float64)
    rounded(values.double().numpy(), out)
    expected = values.to(torch.float16).double()
    actual = torch.from_numpy(out)
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual[~nan], expected[~nan])
    assert torch.equal(actual[~nan].signbit(), expected[~nan].signbit())


def test_float16_geometry_rounding_of_float64_results():
    """The geometry rounds float64 results of one operation on float16 values (quotients,
    products; bin counts up to 2048 are float16 values) and integers up to 2^41: both paths give
    numpy's float64 -> float16 rounding (one rounding, not through float32), ties included."""
    import numpy as np
    from numba import njit

    from roi_ops_numba import geometry

    @njit
    def both(values, fast, exact):
        for i in range(values.shape[0]):
            fast[i] = geometry._round_half(values[i])
            exact[i] = geometry._round_half_bits(values[i])

    g = torch.Generator().manual_seed(72)
    bits = torch.randint(0, 0x7C00, (2, 1 << 18), generator=g, dtype=torch.int32)
    a, b = bits.to(torch.int16).view(torch.float16).double()
    sizes = torch.randint(1, 2**41, (1 << 16,), generator=g, dtype=torch.int64).double()
    near = torch.arange(65400, 65600, dtype=torch.float64)
    counts = torch.arange(1, 2049, dtype=torch.float64).repeat(b.numel() // 2048)  # halves too
    values = torch.cat([a / b, a * b, b / counts, sizes, near])
    values = torch.cat([values, -values])
    fast, exact = np.empty(values.numel()), np.empty(values.numel())
    both(values.numpy(), fast, exact)
    with np.errstate(over="ignore"):  # overflow to inf is part of the rounding tested
        expected = values.numpy().astype(np.float16).astype(np.float64)
    assert np.isfinite(expected).sum() > values.numel() // 2  # mostly finite values
    assert np.array_equal(fast, expected, equal_nan=True)
    assert np.array_equal(exact, expected, equal_nan=True)
    assert np.array_equal(np.signbit(fast), np.signbit(expected))
