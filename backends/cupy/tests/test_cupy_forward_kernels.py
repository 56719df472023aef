"""The CuPy backend's forward kernels bit for bit against the scalar reference: on the CPU
emulator of the kernels without a GPU, through CuPy on a CUDA device (the `runner` fixture).
Every layout (each takes another kernel family), every dtype, the contract's cases, ties,
signed zeros, subnormals, NaN payloads, channel blocks that loop, bins around a block."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch
from cupy_harness import (
    BITS,
    BLOCK_LAYOUTS,
    DTYPE_IDS,
    DTYPES,
    GUARD,
    LAYOUTS,
    check,
    guarded,
    rois_dtype_for,
    run_forward,
    wide,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from roi_ops.testing import (
    assert_same_bits,
    contract_cases,
    reference_roi_pool,
    roi_pool_cases,
    tie_heavy_features,
)

from roi_ops_cupy import kernels
from roi_ops_cupy.planning import plan_copy_channels_last
from roi_ops_cupy.tuning import DEFAULT_TUNING, CupyTuning


def _check_cases(runner, cases, layout):
    """Each of the contract's `cases` in `layout` (widened for the channels_last layouts, so that
    they take a channel-lane kernel)."""
    for case in cases:
        x = wide(case.input) if layout.startswith("channels_last") else case.input
        check(runner, x, case.rois_tensor(), case.output_size, case.spatial_scale, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_contract_cases(runner, dtype, layout):
    _check_cases(runner, contract_cases("cpu", dtype), layout)


@pytest.mark.parametrize("layout", BLOCK_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_float32_rois_with_half_input(runner, dtype, layout):
    _check_cases(runner, contract_cases("cpu", dtype, seed=3, rois_dtype=torch.float32), layout)


@pytest.mark.parametrize("layout", BLOCK_LAYOUTS)
def test_channel_blocks_loop_and_uncached_edges(runner, layout):
    # 72 channels: the cvec kernel's last block of 32 has 2 of its 8 vectors.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 72, 9, 13, generator=g)
    rois = torch.tensor([[0, 0.0, 0.0, 12.0, 8.0], [1, 2.5, 1.5, 9.5, 7.0], [1, -3.0, 2.0, 30, 5]])
    check(runner, x, rois, (3, 4), 1.0, layout=layout, multiprocessors=1, grid_y=1)
    check(runner, x, rois, (3, 4), 1.0, layout=layout, multiprocessors=64)
    uncached = CupyTuning(max_cached_edges=0)
    check(runner, x, rois, (3, 4), 1.0, layout=layout, multiprocessors=64, tuning=uncached)


@pytest.mark.parametrize("layout", BLOCK_LAYOUTS)
@pytest.mark.parametrize("size", [(1, 1), (16, 16), (17, 16), (20, 30), (70, 60)], ids=str)
def test_bins_per_roi_around_one_block(runner, layout, size):
    # nb = 1 (256 groups), 256 (one group, exact), 272 and 600 (threads loop over bins); 70 + 60
    # edges are more than the cvec kernel caches.
    g = torch.Generator().manual_seed(13)
    x = torch.randn(1, 20, 22, 33, generator=g)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 20.0], [0, 4.0, 4.0, 6.0, 5.0]])
    check(runner, x, rois, size, 1.0, layout=layout, multiprocessors=1)


@pytest.mark.parametrize("layout", BLOCK_LAYOUTS)
def test_many_bins_are_staged_in_rounds(runner, layout):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 18, 30, 30, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 27.0, 29.0], [0, 5.0, 5.0, 6.0, 6.0]], dtype=torch.float64)
    check(runner, x, rois, (9, 11), 1.0, layout=layout)  # 99 bins
    # cvec: 900 bins of one float64 vector (4 channels) are more than its tile holds with the
    # argmax (2728 outputs): rounds of 682 bins, each channel's run stored on its own.
    check(runner, x, rois, (30, 30), 1.0, layout=layout)


@pytest.mark.parametrize("l2_bytes", [0, 1 << 30], ids=["static_tile", "large_tile"])
def test_cvec_wide_argmax_in_either_tile(runner, l2_bytes):
    # The wide kernel's float32 forward with the argmax keeps its tile in dynamic shared memory:
    # the static tile's 32 KiB beyond L2, the large tile on a map in L2. 136 channels: blocks of
    # eight lanes of 16 channels in the large tile (four in the static one) on 7x7 bins, the
    # last block two vectors; 14x14 bins and 20x20 (rounds of bins in either tile).
    x = tie_heavy_features((2, 136, 12, 40), 29, torch.float32)
    rois = torch.tensor(
        [
            [0, 3.0, 1.0, 30.0, 10.0],
            [1, -4.0, 0.0, 13.0, 11.0],
            [1, 0.0, 0.0, 39.0, 11.0],
            [0, 20.0, 5.0, 22.0, 6.0],
        ]
    )  # four ROIs of two channel blocks: the eight blocks the plan wants of one SM
    for size in [(7, 7), (14, 14), (20, 20)]:
        check(runner, x, rois, size, 1.0, layout="channels_last_cvec_wide", l2_bytes=l2_bytes)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shift", [1, 3], ids=lambda s: f"shift{s}")
@pytest.mark.parametrize("layout", ["channels_last_cvec", "channels_last_cvec_wide"])
def test_cvec_outputs_off_16_byte_boundaries(runner, dtype, shift, layout):
    # The cvec tile goes out in 16-byte pieces only to an aligned output: outputs a few elements
    # off a boundary take single stores (every element, guards around).
    x = tie_heavy_features((2, 24, 12, 40), 5, dtype)
    rois = torch.tensor([[0, 3.0, 1.0, 30.0, 10.0], [1, -4.0, 0.0, 13.0, 11.0]])
    rois = rois.to(rois_dtype_for(dtype))
    for size in [(7, 7), (14, 14)]:
        reference = reference_roi_pool(x, rois, size, 1.0)
        for needs_argmax in (True, False):
            output, argmax = run_forward(
                runner, x, rois, size, 1.0, layout=layout,
                needs_argmax=needs_argmax, output_shift=shift,
            )  # fmt: skip
            assert_same_bits(output, reference[0])
            if needs_argmax:
                assert torch.equal(argmax, reference[1])


@pytest.mark.parametrize(
    "kernel",
    ["unit", "small", "plane", "cvec", "cvec_wide", "cvec_tables", "small_cvec", "chan"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernels_on_ties_and_specials(runner, dtype, kernel):
    # Ties everywhere, signed zeros, NaN and -inf; channel counts that leave the unit kernel's
    # groups of four channels partly empty; bins narrower than a pixel (with (12, 40) every bin
    # of the first three ROIs has at most 2 x 2 elements: the unit kernel's loop-free path; 200
    # and 196 bins leave 8 and 4 bins to a last warp whose lanes spread over channels);
    # ROIs cut by the border. cvec: 24 float16 channels leave the last of 4 threads per bin
    # empty with the argmax (8 channels a thread) and the second of 2 half its channels in
    # inference (16); 20 float32 (22 float64) channels leave one thread half its channels, and
    # in cvec_wide's float32 one thread of four vectors and one of one (its three missing
    # vectors re-read its first).
    tuning = CupyTuning(forward_kernel=kernels.FORWARD_PLANE) if kernel == "plane" else None
    tuning = tuning or DEFAULT_TUNING
    layout = {
        "cvec": "channels_last_cvec",
        "cvec_wide": "channels_last_cvec_wide",
        "cvec_tables": "channels_last_cvec_tables",
        "small_cvec": "channels_last",
        "chan": "channels_last_unaligned",
        "unit": "contiguous_unit",
    }.get(kernel, "contiguous")
    lane_channels = {torch.float32: 20, torch.float64: 22}.get(dtype, 24)
    channels = lane_channels if layout.startswith("channels_last") else 11
    x = tie_heavy_features((2, channels, 12, 40), 21, dtype)
    rows = [
        [0, 3.0, 1.0, 5.0, 10.0],
        [1, 7.0, 0.0, 13.0, 11.0],
        [0, 2.0, 2.0, 35.0, 9.0],
        [1, -20.0, -3.0, 50.0, 30.0],
        [1, 38.0, 6.0, 90.0, 6.0],
    ]
    rois_dtype = rois_dtype_for(dtype)
    rois = torch.tensor(rows, dtype=torch.float64).to(rois_dtype)
    for size in [(7, 7), (5, 40), (3, 2), (12, 1), (12, 40), (14, 14)]:
        check(runner, x, rois, size, 1.0, layout=layout, multiprocessors=1, tuning=tuning)
    # channel blocks loop
    check(runner, x, rois, (7, 7), 1.0, layout=layout, multiprocessors=64, grid_y=1, tuning=tuning)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_float_edges_reach_one_row_further(runner, dtype):
    # value = row index, so each bin's max sits on its last row
    x = torch.arange(64, dtype=torch.float64).reshape(1, 1, 64, 1).expand(1, 2, 64, 3).to(dtype)
    rois_dtype = rois_dtype_for(dtype)
    rois = torch.tensor([[0, 0.0, 0.0, 2.0, 56.0]], dtype=rois_dtype)  # roi_h = 57
    output, argmax = run_forward(runner, x, rois, (7, 1), 1.0)
    last_row = argmax[0, 0, :, 0] // 3
    if dtype in (torch.float32, torch.bfloat16):  # float32 geometry: bin_h = 8.142857
        assert last_row[-1] == 57  # integer arithmetic would end the last bin at row 56
    assert torch.equal(argmax, reference_roi_pool(x, rois, (7, 1), 1.0)[1])


def test_half_geometry_rounds_every_step(runner):
    # float16 rois round every product and quotient to half; float32 rois with the same
    # float16 input do not. Both must match the reference, including +-65504.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 64, 64, generator=g).to(torch.float16)
    rows = [
        [0, 100.5, 3.3, 201.0, 199.9],
        [0, 0.1, 0.2, 133.0, 1e4],
        [0, 65504, 3, -65504, 4],
        [0, 41.7, 50.5, 43.3, 52.5],
    ]
    for rois_dtype in (torch.float16, torch.float32):
        check(runner, x, torch.tensor(rows, dtype=rois_dtype), (5, 3), 0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_subnormals_and_signed_zeros(runner, dtype):
    # CuPy compiles with -ftz=true, under which float comparisons see subnormals as zero; the
    # kernels compare integer keys instead. -0 and +0 are equal: the first one stays.
    tiny = {
        torch.float16: 2.0**-24,
        torch.bfloat16: 2.0**-133,
        torch.float32: 2.0**-149,
        torch.float64: 2.0**-1074,
    }[dtype]
    pattern = torch.tensor(
        [
            [-0.0, 0.0, tiny, 3 * tiny],
            [-tiny, 2 * tiny, 0.0, -0.0],
            [-2 * tiny, -tiny, -0.0, -3 * tiny],
            [0.0, -0.0, -tiny, tiny],
        ],
        dtype=torch.float64,
    )
    x = torch.stack([pattern, pattern.flip(1), -pattern]).unsqueeze(0).to(dtype)
    assert bool((x != 0).any())
    rois_dtype = rois_dtype_for(dtype)
    rois = torch.tensor(
        [[0, 0, 0, 3, 3], [0, 0, 0, 1, 1], [0, 2, 0, 3, 3], [0, 0, 2, 3, 3]], dtype=rois_dtype
    )
    for size in ((2, 2), (1, 1), (4, 4)):
        check(runner, x, rois, size, 1.0)


_NAN_PAYLOADS = {  # quiet, negative, signalling and odd-payload NaNs of each dtype
    torch.float16: [0x7E00, 0xFE00, 0x7C01, 0x7D55],
    torch.bfloat16: [0x7FC0, 0xFFC0, 0x7F81, 0x7FA5],
    torch.float32: [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FAAAAAA],
    torch.float64: [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FF5555555555555],
}


def _signed(value: int, nbits: int) -> int:
    return value - (1 << nbits) if value >= 1 << (nbits - 1) else value


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_any_nan_is_maximal_and_copied_bit_for_bit(runner, dtype):
    g = torch.Generator().manual_seed(9)
    bits = BITS[torch.empty((), dtype=dtype).element_size()]
    x = (torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64) * 5).to(dtype)
    raw = x.view(bits)
    places = [(0, 1, 2), (0, 4, 4), (1, 0, 5), (1, 3, 3), (2, 2, 1), (3, 5, 0), (3, 1, 1)]
    for i, (c, h, w) in enumerate(places):
        raw[0, c, h, w] = _signed(_NAN_PAYLOADS[dtype][i % 4], 8 * x.element_size())
    assert int(x.isnan().sum()) == len(places)
    rois_dtype = rois_dtype_for(dtype)
    rois = torch.tensor([[0, 0, 0, 5, 5], [0, 1, 1, 5, 5], [0, 0, 2, 3, 5]], dtype=rois_dtype)
    check(runner, x, rois, (2, 3), 1.0)
    output, argmax = run_forward(runner, x, rois, (2, 3), 1.0)
    planes = x.view(bits).reshape(1, 4, 36).expand(3, 4, 36)
    picked = planes.gather(2, argmax.clamp(min=0).long().reshape(3, 4, 6)).reshape(argmax.shape)
    assert torch.equal(output.view(bits)[argmax >= 0], picked[argmax >= 0])
    # Inference (no argmax) takes another reduction (max.NaN in the unit kernel): same bits.
    inference, _ = run_forward(runner, x, rois, (2, 3), 1.0, needs_argmax=False)
    assert torch.equal(inference.view(bits), output.view(bits))


_MASKED = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize(
    "layout", ["channels_last_cvec", "channels_last_cvec_wide", "channels_last"]
)
@pytest.mark.parametrize("dtype", _MASKED, ids=["float32", "float16", "bfloat16"])
def test_cvec_masked_argmax_on_zeros_subnormals_nans_and_ties(runner, dtype, layout):
    # The 16-bit argmax of the cvec and small_cvec kernels steps masks (two channels an
    # instruction) and finds a maximum that is a zero or a NaN again by a scan; float32's
    # compares and selects, on the same values. 16 channels (two threads of 8 with the argmax;
    # one thread of two vectors in 16-bit inference, whose zero/NaN rescans reach the second),
    # each its own mix of signed zeros, subnormals, NaN payloads, -inf and ties, none shifted
    # (as `wide` would).
    g = torch.Generator().manual_seed(13)
    bits = BITS[torch.empty((), dtype=dtype).element_size()]
    tiny = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}[dtype]
    menu = torch.tensor(
        [0.0, -0.0, tiny, -tiny, 2 * tiny, 1.0, -1.0, -math.inf, math.inf, 2.0], dtype=torch.float64
    )
    x = menu[torch.randint(0, len(menu), (2, 16, 9, 11), generator=g)].to(dtype)
    x[:, 0] = -0.0  # a channel of zeros: the first zero, either sign
    x[:, 1] = -math.inf  # nothing raises the maximum: the first element
    x[:, 2] = torch.where(x[:, 2] > 0, -x[:, 2], x[:, 2])  # zeros the maxima, or subnormals
    x[:, 3] = tiny  # ties of subnormals everywhere: the first
    raw = x.view(bits)
    nan_places = torch.rand(x.shape, generator=g) < 0.03
    payloads = _NAN_PAYLOADS[dtype]
    for i, where in enumerate(nan_places.nonzero().tolist()):
        raw[tuple(where)] = _signed(payloads[i % 4], 8 * x.element_size())
    rois_dtype = rois_dtype_for(dtype)
    rois = torch.tensor(
        [[0, 0, 0, 10, 8], [1, 1, 2, 7, 8], [0, 3, 0, 3, 8], [1, -2, -1, 12, 3], [0, 2, 2, 2, 2]],
        dtype=torch.float64,
    ).to(rois_dtype)
    for size in ((1, 1), (2, 3), (3, 3), (9, 11)):
        check(runner, x, rois, size, 1.0, layout=layout)


@pytest.mark.parametrize("dtype", _MASKED, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("height, width", [(2, 256), (1, 257), (257, 1), (256, 3)])
def test_cvec_masked_argmax_in_bins_up_to_and_past_256(runner, dtype, height, width):
    # The 16-bit masked argmax holds a bin position as row << 8 | column: bins of at most 256
    # rows and columns; longer ones take the one-channel-at-a-time argmax (float32's always).
    # Each channel's maximum is planted late in the bin, with a tie after it and one before it
    # on another channel.
    g = torch.Generator().manual_seed(17)
    x = (torch.rand((1, 8, height, width), generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    for c in range(8):
        i, j = height - 1 - c % height, width - 1 - (3 * c) % width
        x[0, c, i, j] = 8.0
        x[0, c, height - 1, width - 1] = 8.0  # a later tie: not taken (unless the same place)
    x[0, 5, 0, 0] = 8.0  # the first element is the first maximum
    rois = torch.tensor([[0, 0, 0, width - 1, height - 1]], dtype=torch.float64)
    rois = rois.to(rois_dtype_for(dtype))
    for size in ((1, 1), (1, 2), (2, 1)):
        check(runner, x, rois, size, 1.0, layout="channels_last_cvec")


def test_emulated_half_conversions_are_round_to_nearest_even(emulator):
    to_half = emulator.library.roi_float_to_half
    to_half.restype, to_half.argtypes = ctypes.c_ushort, [ctypes.c_float]
    back = emulator.library.roi_half_to_float
    back.restype, back.argtypes = ctypes.c_float, [ctypes.c_ushort]
    g = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(2000, generator=g) * 10.0 ** torch.randint(-9, 6, (2000,), generator=g),
            torch.tensor(
                [
                    65504.0,
                    65519.9,
                    65520.0,
                    1e6,
                    2.0**-24,
                    2.0**-25,
                    3 * 2.0**-26,
                    0.0,
                    -0.0,
                    math.inf,
                    -math.inf,
                    2049.0,
                    2051.0,
                    1.00048828125,
                ]
            ),
        ]
    ).float()
    expected = values.to(torch.float16).view(torch.int16).numpy().astype(np.uint16)
    got = np.array([to_half(float(v)) for v in values], dtype=np.uint16)
    assert np.array_equal(got, expected)
    halves = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = ~halves.isnan()
    decoded = torch.tensor([back(int(h)) for h in range(2**16)], dtype=torch.float32)
    assert torch.equal(decoded[finite], halves.float()[finite])
    assert bool(decoded[~finite].isnan().all())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hypothesis_differential(runner, layout):
    @settings(
        max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(roi_pool_cases(max_rois=6), st.booleans())
    def run(case, needs_argmax):
        x = wide(case.input) if layout.startswith("channels_last") else case.input
        rois = case.rois_tensor()
        expected, expected_argmax = reference_roi_pool(
            x, rois, case.output_size, case.spatial_scale
        )
        output, argmax = run_forward(
            runner,
            x,
            rois,
            case.output_size,
            case.spatial_scale,
            layout=layout,
            needs_argmax=needs_argmax,
        )
        assert_same_bits(output, expected)
        if needs_argmax:
            assert torch.equal(argmax, expected_argmax)

    run()


# (N, C, H, W): channels and positions (H * W) around the tiles (64 positions by 128 bytes of
# channels: 32 float32, 64 16-bit, 16 float64), C in whole 16-byte vectors or not, one channel,
# one pixel.
COPY_SHAPES = [
    (2, 40, 5, 9),
    (1, 64, 4, 16),
    (1, 70, 9, 8),
    (2, 72, 13, 11),
    (3, 33, 1, 1),
    (1, 1, 6, 11),
    (1, 8, 33, 1),
    (2, 100, 6, 14),
    (1, 40, 17, 19),  # several position tiles of an image, the last one partly filled
]
# Where the input's rows are (dense planes with images a few elements apart, rows further apart:
# the first columns of a wider map, or a packed NCHW tensor, 16-byte aligned or one element
# past it: 16-bit planes of an even size read two positions a load only where aligned) and how
# many elements the copy starts past a 16-byte boundary (1: no 16-byte stores).
COPY_PLACES = [
    ("dense", 0),
    ("padded", 0),
    ("dense", 1),
    ("packed", 0),
    ("packed-late", 0),
    ("spaced", 0),  # channel planes one element apart: an even stride beside odd planes
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", COPY_SHAPES, ids=str)
@pytest.mark.parametrize("rows, shift", COPY_PLACES, ids=str)
def test_channels_last_copy_is_the_input_bit_for_bit(runner, dtype, shape, rows, shift):
    """The staged forward's copy kernel: every element's bits (NaN payloads, signed zeros) land
    at its channels_last place, from dense inputs and from inputs whose rows and images are
    further apart than dense, into aligned and unaligned copies, and nothing outside the copy
    is written."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    info = torch.iinfo(BITS[dtype.itemsize])
    bits = torch.randint(info.min, info.max, shape, generator=g, dtype=BITS[dtype.itemsize])
    x = bits.view(dtype)
    pad = 3 if rows == "padded" else 0
    gap = 0 if rows.startswith("packed") else 5
    strides = (c * h * (w + pad) + gap, h * (w + pad), w + pad, 1)
    if rows == "spaced":
        strides = (c * (h * w + 1), h * w + 1, w, 1)
    late = 1 if rows == "packed-late" else 0
    placed, _ = guarded(shape, strides, dtype, runner.device, math.nan, shift=late)
    placed.copy_(x)
    cl = torch.empty(shape, device="meta", memory_format=torch.channels_last).stride()
    copy, buffer = guarded(shape, cl, dtype, runner.device, -7.0, shift=shift)
    copy.fill_(1.5)
    runner.launch(plan_copy_channels_last(placed, copy))
    assert torch.equal(copy.cpu().contiguous().view(bits.dtype), bits)
    guard = torch.cat([buffer[: GUARD + shift], buffer[-GUARD:]]).cpu()
    assert bool((guard == -7.0).all()), "the copy wrote outside its tensor"


def test_channels_last_copy_refuses_what_it_cannot_copy():
    x = torch.randn(2, 16, 5, 6)
    good = torch.empty_like(x, memory_format=torch.channels_last)
    empty = torch.empty(2, 16, 0, 6, memory_format=torch.channels_last)
    assert plan_copy_channels_last(x[:, :, :0], empty) is None  # nothing to copy
    with pytest.raises(ValueError, match="copy: expected a dense channels_last tensor"):
        plan_copy_channels_last(x, torch.empty_like(x))
    with pytest.raises(ValueError, match="copy: expected"):
        plan_copy_channels_last(x, good.half())
    with pytest.raises(ValueError, match="input: expected a W stride of 1"):
        plan_copy_channels_last(
            x[..., ::2], torch.empty_like(x[..., ::2]).to(memory_format=torch.channels_last)
        )
    huge = torch.empty(1, 256, 2**12, 2**11, device="meta")
    with pytest.raises(ValueError, match="input: expected every offset within an image below"):
        plan_copy_channels_last(huge, torch.empty_like(huge, memory_format=torch.channels_last))


_TABLE_LAYOUTS = ["channels_last_cvec_tables", "channels_last_cvec_wide_tables"]


@pytest.mark.parametrize("layout", _TABLE_LAYOUTS)
@pytest.mark.parametrize("dtype", _MASKED, ids=["float32", "float16", "bfloat16"])
def test_tables_of_maxima_on_zeros_nans_and_ties(runner, dtype, layout):
    # Bins of every side the tables serve (1 to 9 rows and columns: the map, the 2 x 2 table,
    # the 4 x 4 one, squares overlapping at odd ends), their maxima tied, signed zeros (a table's
    # max.NaN may return either) and NaNs of every payload (a table's loses it): the outputs are
    # the scan's, bit for bit.
    bits = BITS[torch.empty((), dtype=dtype).element_size()]
    x = wide(tie_heavy_features((2, 3, 19, 23), 31, dtype))
    raw = x.view(bits)
    raw[0, 0, 3:5, 4:9] = 0
    negative_zero = 0x80000000 if dtype == torch.float32 else 0x8000
    raw[0, 0, 4, 6] = _signed(negative_zero, 8 * x.element_size())
    for i, (c, h, w) in enumerate([(1, 2, 2), (2, 10, 11), (0, 15, 3), (5, 7, 20)]):
        raw[i % 2, c, h, w] = _signed(_NAN_PAYLOADS[dtype][i], 8 * x.element_size())
    rows = [
        [0, 0, 0, 22, 18],
        [1, 1, 2, 20, 17],
        [0, 3, 1, 12, 9],
        [1, 5, 4, 8, 16],
        [0, 2, 3, 3, 4],
    ]
    rois = torch.tensor(rows, dtype=torch.float64).to(rois_dtype_for(dtype))
    for size in [(1, 1), (2, 3), (3, 2), (5, 4), (7, 7), (9, 2)]:
        check(runner, x, rois, size, 1.0, layout=layout)


@pytest.mark.parametrize("rois_dtype", [torch.float32, torch.float64, torch.float16])
def test_table_count_and_decision_from_the_reads_the_tables_save(runner, rois_dtype):
    # The count's blocks sum to the count from the reference geometry (every bin: its elements
    # less the table entries it reads) with every block striding (more ROIs than its most
    # blocks' threads); the build decides yes just below that count per map position, no just
    # above, from the counts of the count's blocks only (the other bytes stay poisoned).
    from cupy_harness import build_tables
    from roi_ops.backend import RoIPoolProblem
    from roi_ops.testing.reference import roi_bins

    from roi_ops_cupy import planning

    g = torch.Generator().manual_seed(17)
    n, h, w = 3, 41, 57
    k = 300
    corners = torch.rand(k, 2, generator=g) * torch.tensor([w, h]) * 1.2 - 4
    sides = torch.exp(torch.rand(k, 2, generator=g) * 4)
    batch = torch.randint(-1, n + 1, (k, 1), generator=g).float()
    rois = torch.cat([batch, corners, corners + sides], dim=1).to(rois_dtype)
    copies = 1 + kernels.TABLE_SAVINGS_BLOCKS * kernels.TABLE_SAVINGS_THREADS // k
    many = rois.repeat(copies, 1).to(runner.device)
    x = wide(tie_heavy_features((n, 4, h, w), 3, torch.float32))
    x = x.to(runner.device).contiguous(memory_format=torch.channels_last)
    blocks = kernels.TABLE_SAVINGS_BLOCKS
    for size in [(7, 7), (3, 5), (14, 14)]:
        saved = 0
        for row in rois.double().tolist():
            bins = roi_bins(row, n, h, w, size, 0.5, rois_dtype)
            if bins is None:
                continue
            for y0, y1 in bins[1]:
                for x0, x1 in bins[2]:
                    bh, bw = max(y1 - y0, 0), max(x1 - x0, 0)
                    s = 4 if bh >= 4 and bw >= 4 else 2 if bh >= 2 and bw >= 2 else 1
                    saved += bh * bw - -(-bh // s) * -(-bw // s)
        assert saved > 0
        saved *= copies
        problem = RoIPoolProblem(x, many, *size, 0.5, False)
        assert planning.table_savings_blocks(problem.num_rois) == blocks
        positions = n * h * w
        for threshold, expected in ((saved - 0.5, 1), (saved + 0.5, 0)):
            tuning = CupyTuning(table_min_saved_reads=threshold / positions)
            _, decision = build_tables(runner, problem, tuning)
            head = decision.cpu()
            assert head[0] == expected and head[1:4].tolist() == [-7, -7, -7]
            counts = head[4 : 4 + 2 * blocks].view(torch.int64)
            assert int(counts.sum()) == saved
            assert head[4 + 2 * blocks :].tolist() == [-7] * (len(head) - 4 - 2 * blocks)


@pytest.mark.parametrize("dtype", _MASKED, ids=["float32", "float16", "bfloat16"])
def test_tables_are_neither_built_nor_read_when_the_decision_says_no(runner, dtype):
    # Decision 0: the build writes nothing (its poisoned buffer stays poisoned) and the cvec
    # kernel reads the map (a poisoned table would show as NaN outputs).
    from cupy_harness import guarded, place_input, poisoned_outputs, sizes
    from roi_ops.backend import RoIPoolProblem

    from roi_ops_cupy import planning

    x = wide(tie_heavy_features((2, 3, 16, 16), 7, dtype))
    rois = torch.tensor([[0, 0, 0, 15, 15], [1, 2, 3, 14, 12]]).to(rois_dtype_for(dtype))
    placed = place_input(x, "channels_last_cvec", runner.device)
    rois_d = rois.to(runner.device)
    problem = RoIPoolProblem(placed, rois_d, 3, 3, 1.0, False)
    decision = torch.full((planning.TABLE_HEAD_BYTES // 4,), -7, dtype=torch.int32)
    decision = decision.to(runner.device)
    tables, _ = guarded((2 * x.numel(),), (1,), dtype, runner.device, math.nan)
    never = CupyTuning(table_min_saved_reads=1e9)
    runner.launch(planning.plan_table_savings(problem, decision))
    runner.launch(planning.plan_max_tables(problem, decision, tables, sizes(), never))
    assert int(decision[0]) == 0
    assert bool(tables.isnan().all())
    output, _, _, _ = poisoned_outputs(problem.output_shape, dtype, runner.device, False)
    tuning = CupyTuning(forward_kernel=kernels.FORWARD_CVEC)
    runner.launch(planning.plan_forward(problem, output, None, sizes(), tuning, tables, decision))
    assert_same_bits(output.cpu(), reference_roi_pool(x, rois, (3, 3), 1.0)[0])
