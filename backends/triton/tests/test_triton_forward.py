"""The forward kernels against the scalar reference, bit for bit: the contract's cases and
traps, every dtype and layout, every kernel and tile shape, reads that never leave the input.

Without a GPU the kernels run in Triton's CPU interpreter on CPU tensors (see conftest.py); with
one, the compiled kernels run on CUDA tensors. Shapes are tiny because the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from roi_ops.testing import contract_cases, roi_pool_cases, tie_heavy_features

pytest.importorskip("triton")

from triton_cases import (  # noqa: E402
    COMPILED,
    DEVICES,
    DTYPE_IDS,
    DTYPES,
    LAYOUTS,
    check,
    embedded,
    in_layout,
    rois_dtype,
    run_forward,
)

from roi_ops_triton import launch, plan  # noqa: E402
from roi_ops_triton.tuning import DEFAULT_TUNING, Tuning  # noqa: E402

# --------------------------------------------------------------------------------------------
# The contract's cases, every dtype and layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_contract_cases(device, dtype):
    """Scales 1/16 and 0.5, .5 rounding, off-map/inverted, ties, NaN/-inf, float edges, K=0,
    invalid rows and huge coordinates (the kernel has no value checks to rely on), channels_last
    here; the conformance kit (test_triton_conformance.py) runs them contiguous, through
    roi_ops.roi_pool."""
    for case in contract_cases(device, dtype):
        x = in_layout(case.input, "channels_last")
        check(x, case.rois_tensor(), case.output_size, case.spatial_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_no_read_outside_the_input(device, layout, dtype):
    """Invalid batch indices, NaN/inf and huge coordinates on a view inside a NaN buffer."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 9, 5, 6, generator=g) * 3).to(dtype).to(device)
    big = 6e4 if dtype == torch.float16 else 1e30
    rows = [
        [2.0, 0, 0, 3, 3],
        [-1.0, 0, 0, 3, 3],
        [-0.9, 0, 0, 9, 9],
        [1.999, -3, -3, 99, 99],
        [0.0, math.nan, 0, 3, 3],
        [1.0, 0, 0, math.inf, 3],
        [math.inf, 0, 0, 3, 3],
        [0.0, -big, -big, big, big],
        [1.0, big, big, -big, -big],
        [1.0, -big, 2.0, 3.0, big],
        [0.0, 5, 4, 5, 4],
        [1.0, 6, 5, 60, 50],
    ]
    rois = torch.tensor(rows, dtype=torch.float64).to(dtype).to(device)
    check(embedded(x, layout), rois, (2, 3), 1.0)


# --------------------------------------------------------------------------------------------
# Targeted traps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bin_edges_exposed_by_monotone_features(device, dtype):
    """Features increasing along rows and columns put each bin's argmax on its last pixel (and,
    negated, on its first), so any bin edge off by one shows. Many ROIs, several scales."""
    g = torch.Generator().manual_seed(5)
    height, width = 23, 29
    ramp = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width)
    rdt = rois_dtype(dtype)
    count = 8
    boxes = torch.rand(count, 4, generator=g, dtype=torch.float64) * 60 - 10
    boxes[: count // 3] = boxes[: count // 3].round() + 0.5  # exact halves before scaling
    low = torch.minimum(boxes[:, :2], boxes[:, 2:])
    high = torch.maximum(boxes[:, :2], boxes[:, 2:])
    rois = torch.cat([torch.zeros(count, 1, dtype=torch.float64), low, high], 1)
    for values in (ramp, -ramp):
        # float16 and bfloat16 cannot hold 667 distinct integers: scale into a safe range.
        x = (values / 8).round() if dtype in (torch.float16, torch.bfloat16) else values
        x = x.to(dtype).to(device)
        for scale, size in ((0.5, (7, 7)), (1 / 3, (3, 5)), (0.25, (2, 3))):
            check(x, rois.to(rdt).to(device), size, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_float_edge_last_bin_is_longer(device):
    """float32, roi height 57, PH 7: the last bin ends at ceil(7 * 8.142857) = 58 rows."""
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 64, 1).repeat(1, 1, 1, 2)
    rois = torch.tensor([[0.0, 0.0, 0.0, 1.0, 56.0]])
    _, argmax = check(x.to(device), rois.to(device), (7, 1), 1.0)
    assert argmax[0, 0, -1, 0].item() == 57 * 2  # row 57, one past 57 * 7 / 7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_signed_zero_nan_and_subnormal_order(device, dtype):
    """First maximum among -0.0 and +0.0; first NaN wins over +inf; subnormals are ordered
    (a flush-to-zero comparison would call them equal)."""
    tiny = torch.finfo(dtype).tiny
    x = torch.zeros(1, 4, 2, 4, dtype=torch.float64)
    x[0, 0] = torch.tensor([[-0.0, 0.0, -1.0, -0.0], [0.0, -0.0, -2.0, -3.0]])
    x[0, 1] = torch.tensor([[1.0, math.inf, 2.0, math.nan], [math.nan, 3.0, math.inf, 0.0]])
    x[0, 2] = torch.tensor([[tiny / 4, tiny / 2, -tiny / 2, tiny / 8], [0.0, tiny / 4, -0.0, 0]])
    x[0, 3] = torch.tensor([[-math.inf] * 4, [-math.inf, -math.inf, 1.0, -math.inf]])
    x = x.to(dtype)
    if dtype == torch.bfloat16:
        x[0, 2] = x[0, 2].float().to(dtype)  # keep the subnormals that bfloat16 can hold
    rois = torch.tensor([[0.0, 0, 0, 3, 1], [0.0, 0, 0, 1, 1], [0.0, 2, 0, 3, 1]])
    for size in ((1, 1), (2, 2), (1, 2)):
        check(x.to(device), rois.to(rois_dtype(dtype)).to(device), size, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("channels", [16, 68])
def test_channels_last_kernel_on_ties_and_specials(device, dtype, channels):
    """The channels_last kernel with whole channel blocks (16: every dtype's BLOCK_C divides it
    or exceeds it) and several blocks with a partial last one (68); ties, signed zeros, NaN and
    -inf; bins at the border, empty bins, a bad ROI. On the GPU the aligned inputs take 16-byte
    loads, the embedded (offset) one does not."""
    x = tie_heavy_features((2, channels, 9, 13), 17, dtype)
    rois = torch.tensor(
        [
            [0.0, 0, 0, 12, 8],
            [1.0, 2.5, 1, 9, 7.5],
            [1.0, -4, 3, 30, 20],
            [0.0, 5, 5, 5, 5],
            [3.0, 1, 1, 4, 4],
        ],
        dtype=torch.float64,
    ).to(rois_dtype(dtype))
    assert plan.forward_kernel(
        in_layout(x, "channels_last").stride(), channels, DEFAULT_TUNING
    ) == ("channels_last")
    for placed in (in_layout(x, "channels_last"), embedded(x, "channels_last")):
        for size in ((7, 7), (3, 2), (9, 13)):
            check(placed.to(device), rois.to(device), size, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_half_geometry_rounding(device, dtype):
    """Coordinates and scales whose products round differently in float16 and float32."""
    x = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(2)).to(dtype)
    coords = torch.tensor(
        [
            [0.0, 2047.0, 1025.0, 2049.0, 2051.0],
            [0.0, 300.3, 133.7, 615.9, 627.1],
            [0.0, 0.49999997, 1.5, 2.5, 3.4999998],
            [0.0, 61.9, 7.77, 63.99, 65.0],
            [0.0, -1.5, -2.5, 70000.0, 1e5],
        ],
        dtype=torch.float64,
    )
    for scale in (1 / 16, 1 / 3, 0.0625001, 1 / 7):
        check(x.to(device), coords.to(dtype).to(device), (3, 7), scale)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_degenerate_shapes(device):
    x = torch.randn(2, 3, 4, 5).to(device)
    check(x, torch.empty(0, 5, device=device), (2, 2), 1.0)  # K = 0
    check(x[:, :0], torch.tensor([[0.0, 0, 0, 3, 3]], device=device), (2, 2), 1.0)  # C = 0
    check(x[:, :, :0], torch.tensor([[0.0, 0, 0, 3, 3]], device=device), (2, 2), 1.0)  # H = 0
    check(
        torch.randn(1, 1, 1, 1).to(device),
        torch.tensor([[0.0, 0, 0, 0, 0]], device=device),
        (3, 2),
        1.0,
    )


# --------------------------------------------------------------------------------------------
# Every kernel and tile shape
# --------------------------------------------------------------------------------------------

# (layouts, tuning): each kernel with several tile shapes, several blocks per ROI.
TUNINGS = {
    "flat": (LAYOUTS, Tuning(kernel="flat")),
    "flat-16-lanes": (LAYOUTS, Tuning(kernel="flat", flat_lanes=16)),
    # The unit kernel: fewer lanes than bins (several bin rounds); two lane groups, one round
    # per program; ten groups, rounds past the channel count; one and two channels per lane.
    "unit-4-lanes": (["contiguous"], Tuning(unit_lanes=4, unit_warps=1)),
    "unit-16-lanes": (
        ["contiguous"],
        Tuning(unit_lanes=16, unit_outputs_cached=8, unit_outputs_streamed=8),
    ),
    "unit-64-lanes": (
        ["contiguous"],
        Tuning(unit_lanes=64, unit_warps=2, unit_outputs_cached=24, unit_outputs_streamed=24),
    ),
    "unit-1-channel": (["contiguous"], Tuning(unit_channels=1, unit_lanes=32, unit_warps=1)),
    "unit-2-channels": (["contiguous"], Tuning(unit_channels=2, unit_outputs_streamed=8)),
    "channels-last-8x16": (
        LAYOUTS,
        Tuning(kernel="channels_last", channels_last_bytes=32, channels_last_bins=16),
    ),
    "channels-last-4x4": (
        LAYOUTS,
        Tuning(kernel="channels_last", channels_last_bytes=16, channels_last_bins=4),
    ),
    "channels-last-16x64": (
        LAYOUTS,
        Tuning(kernel="channels_last", channels_last_bytes=64, channels_last_bins=64),
    ),
}
TILE_CASES = [
    pytest.param(layout, tuning, id=f"{name}-{layout}")
    for name, (layouts, tuning) in TUNINGS.items()
    for layout in layouts
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout, tuning", TILE_CASES)
def test_tile_configurations(device, layout, tuning, monkeypatch):
    """Each kernel and tile shape on float32, with several blocks per ROI and the grid split
    into launches of at most three blocks (a block offset)."""
    monkeypatch.setattr(launch, "MAX_GRID_Y", 3)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 9, 5, 19, generator=g).round()  # ties
    x[1, 2, 3, 4:9] = math.nan
    x[0, 4] = -math.inf
    rois = torch.tensor(
        [[0.0, 0, 0, 18, 4], [1.0, 2.5, 1, 16, 3.5], [1.0, 7, 2, 3, 1], [0.0, -3, 2, 30, 9]]
    )
    check(in_layout(x, layout).to(device), rois.to(device), (2, 3), 1.0, tuning)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["float16", "float64"])
def test_flat_kernel_on_strided_input(device, dtype):
    """A W stride of 2 (not a fast layout) takes the flat tile: 16-bit and 64-bit arithmetic,
    float16 half geometry and a bad row."""
    g = torch.Generator().manual_seed(6)
    wide = (torch.randn(2, 5, 6, 18, generator=g) * 4).round().to(dtype)
    x = wide[..., ::2]
    assert plan.forward_kernel(x.stride(), 5, DEFAULT_TUNING) == "flat"
    rois = torch.tensor([[1.0, 0.5, 0, 8, 5], [0.0, 3, 2, 4, 3], [2.0, 0, 0, 1, 1]])
    check(x.to(device), rois.to(dtype).to(device), (3, 2), 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_hypothesis_differential(device):
    @settings(
        max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(roi_pool_cases(max_side=8, max_rois=4))
    def run(case) -> None:
        shape = case.input.shape
        layout = "channels_last" if shape[1] > 1 and case.input.numel() % 2 else "contiguous"
        check(
            in_layout(case.input, layout).to(device),
            case.rois_tensor().to(device),
            case.output_size,
            case.spatial_scale,
        )

    run()


@COMPILED
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_float16_results_keep_the_bits_of_the_winner(layout):
    """Every float16 output is the bits of the input element its argmax names, NaN payloads
    (quiet, signalling, negative) included, in training and inference, for the unit kernel
    (contiguous) and the flat tile (a W stride of 2)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 9, 14, generator=g).round().half()
    payloads = torch.tensor([0x7E01, 0x7D00, -0x0200, 0x7C01, 0x7FFF], dtype=torch.int16)
    where = torch.rand(x.shape, generator=g) < 0.04
    picks = payloads[torch.randint(0, len(payloads), (int(where.sum()),), generator=g)]
    x.view(torch.int16)[where] = picks
    if layout == "strided":
        wide = torch.full((2, 12, 9, 28), math.nan, dtype=torch.float16)
        wide[..., ::2] = x
        x = wide[..., ::2]
    x = x.cuda()
    rois = torch.tensor(
        [[0.0, 0, 0, 13, 8], [1.0, 2.5, 1, 11, 7.5], [1.0, 3, 2, 5, 4], [0.0, -3, 2, 30, 9]]
    ).half()
    output, argmax = run_forward(x, rois.cuda(), (3, 4), 1.0)
    inference, _ = run_forward(x, rois.cuda(), (3, 4), 1.0, needs_argmax=False)
    planes = x.cpu().contiguous().view(torch.int16).flatten(2)  # (N, C, H * W)
    batch = rois[:, 0].long()[:, None, None, None].expand(argmax.shape)
    channel = torch.arange(12)[None, :, None, None].expand(argmax.shape)
    index = argmax.cpu().long()
    winners = planes[batch, channel, index.clamp(min=0)]
    filled = index >= 0
    assert filled.sum() > 100 and x.isnan().any()
    assert torch.equal(output.cpu().view(torch.int16)[filled], winners[filled])
    assert torch.equal(inference.cpu().view(torch.int16), output.cpu().view(torch.int16))
