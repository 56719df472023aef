"""The numba backend against the scalar reference, bit for bit (forward) and its backward."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from roi_ops.backend import RoIPoolProblem
from roi_ops.testing.reference import reference_roi_pool, reference_roi_pool_backward

pytest.importorskip("numba")
numba_backend = pytest.importorskip("roi_ops_numba.backend")

NumbaBackend = numba_backend.NumbaBackend

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last"]
_BIT_VIEWS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


@pytest.fixture(scope="module")
def backend() -> NumbaBackend:
    instance = NumbaBackend()
    reason = instance.check_available()
    if reason is not None:
        pytest.skip(f"numba backend unavailable: {reason}")
    return instance


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def run_forward(
    backend: NumbaBackend,
    x: torch.Tensor,
    rois: torch.Tensor,
    size: tuple[int, int],
    scale: float,
    needs_argmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call the backend on outputs poisoned with NaN and -7."""
    problem = RoIPoolProblem(x, rois, size[0], size[1], scale, needs_argmax)
    output = torch.full(problem.output_shape, float("nan"), dtype=x.dtype)
    argmax = torch.full(problem.output_shape, -7, dtype=torch.int32) if needs_argmax else None
    backend.forward(problem, output, argmax)
    return output, argmax


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit equality (so -0.0 differs from +0.0); NaNs must match in place, not in payload."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = _BIT_VIEWS[actual.dtype]
    nan = expected.isnan()
    mismatch = (actual.isnan() != nan) | (~nan & (actual.view(bits) != expected.view(bits)))
    if mismatch.any():
        where = mismatch.nonzero()[:5].tolist()
        pytest.fail(f"{int(mismatch.sum())} elements differ, e.g. at {where}")


def check(
    backend: NumbaBackend,
    x: torch.Tensor,
    rois: torch.Tensor,
    size: int | tuple[int, int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward with and without argmax against the reference; returns (output, argmax)."""
    size = (size, size) if isinstance(size, int) else size
    expected_out, expected_arg = reference_roi_pool(x, rois, size, scale)
    output, argmax = run_forward(backend, x, rois, size, scale)
    assert_same_bits(output, expected_out)
    assert torch.equal(argmax, expected_arg)
    output_only, none = run_forward(backend, x, rois, size, scale, needs_argmax=False)
    assert none is None
    assert_same_bits(output_only, expected_out)
    return output, argmax


def random_features(shape, dtype, generator, ties: bool = False) -> torch.Tensor:
    if ties:
        values = torch.randint(-3, 4, shape, generator=generator).to(torch.float64)
    else:
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * 4
    values.view(-1)[0] = 1.5  # never all zero
    return values.to(dtype)


def random_rois(num_rois, num_images, height, width, scale, generator) -> torch.Tensor:
    """Boxes in image pixels, some off the map, some inverted; batch indices all valid."""
    batch = torch.randint(0, num_images, (num_rois, 1), generator=generator).to(torch.float64)
    lo = torch.tensor([-3.0, -3.0]) / scale
    hi = torch.tensor([width + 3.0, height + 3.0]) / scale
    p1 = lo + torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * (hi - lo)
    p2 = lo + torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * (hi - lo)
    return torch.cat([batch, p1, p2], dim=1)


# ---------------------------------------------------------------------------------------------
# Declaration and packaging


def test_declaration(backend):
    assert backend.name == "numba"
    assert backend.priority == 50
    assert backend.device_types == frozenset({"cpu"})
    assert backend.dtypes == frozenset(DTYPES)
    assert backend.deterministic is True
    assert backend.check_available() is None


def test_backend_module_does_not_import_numba():
    code = (
        "import sys, roi_ops_numba.backend as b; b.NumbaBackend();"
        "assert 'numba' not in sys.modules, 'numba imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reports_missing_numba():
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "from roi_ops_numba.backend import NumbaBackend\n"
        "reason = NumbaBackend().check_available()\n"
        "assert reason and 'numba' in reason, reason"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_entry_point_registered():
    from importlib.metadata import entry_points

    points = {ep.name: ep.value for ep in entry_points(group="roi_ops.backends")}
    assert points.get("numba") == "roi_ops_numba.backend:NumbaBackend"


def test_not_supported_reasons(backend):
    x = torch.rand(1, 2, 4, 4, device="meta")
    rois = torch.zeros(1, 5, device="meta")
    reasons = backend.not_supported_reasons(RoIPoolProblem(x, rois, 2, 2, 1.0, True))
    assert any("meta" in r for r in reasons)
    cpu = RoIPoolProblem(torch.rand(1, 2, 4, 4), torch.zeros(1, 5), 2, 2, 1.0, True)
    assert backend.not_supported_reasons(cpu) == []


# ---------------------------------------------------------------------------------------------
# Forward, by case


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
    x = _layout(random_features((2, 3, 9, 11), dtype, g, ties), layout)
    rois = random_rois(10, 2, 9, 11, scale, g).to(dtype)
    check(backend, x, rois, (3, 4), scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_rois_with_half_input(backend, dtype, layout):
    g = torch.Generator().manual_seed(7)
    x = _layout(random_features((2, 4, 8, 10), dtype, g, ties=True), layout)
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
    x = _layout(random_features((2, 3, 6, 7), dtype, g), layout)
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
    x = _layout(x, layout)
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
def test_staging_paths(backend, monkeypatch, stage_bytes, dtype):
    """NCHW tasks stage their ROI window or bin-row band channels-last, or gather in place."""
    from roi_ops_numba import ops

    if stage_bytes is not None:
        monkeypatch.setattr(ops, "_STAGE_BYTES", stage_bytes)
    g = torch.Generator().manual_seed(43)
    x = random_features((2, 3, 12, 13), dtype, g, ties=True)
    rois = random_rois(12, 2, 12, 13, 1.0, g).to(dtype)
    check(backend, x, rois, (3, 2), 1.0)
    check(backend, x[:, :, 1:, 2:], rois, (2, 3), 1.0)  # strided rows, storage offset


@pytest.mark.parametrize("coverage", [0.0, math.inf], ids=["grouped", "per-roi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_float_paths(backend, monkeypatch, coverage, dtype):
    """float32/float64 NCHW: staged per group of ROIs and channel block, or per ROI."""
    from roi_ops_numba import ops

    monkeypatch.setattr(ops, "_STAGE_MIN_COVERAGE", coverage)
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
def test_stage(backend, dtype):
    """The channels-last staging copy, against torch: blocks of 16 planes and the planes left
    (two blocks of 16 channels and 4 more; 17 from channel 3), a non-unit W stride and a
    storage offset. int16 is how float16 and bfloat16 are staged (as raw bits)."""
    pytest.importorskip("numba")
    from roi_ops_numba import kernels
    from roi_ops_numba.ops import flat_storage

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
                kernels._stage(src, plane0, s_c, s_h, s_w, nc, y0, y1, x0, x1, dst.numpy())
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
    backend, monkeypatch, min_block, task_bytes, tasks_per_thread, max_bytes, dtype
):
    """float32/float64 NCHW tasks stage a block of channels of a group of ROIs' region: blocks
    of one channel, ROIs cut into many groups (each restaging its own region), the defaults, a
    buffer limit that allows only a few channels per block, and one that sends every ROI to
    the per-ROI kernel; with invalid ROIs, ROIs past the map and empty bins among them. The
    same groups read channels_last inputs in place."""
    from roi_ops_numba import ops

    monkeypatch.setattr(ops, "_STAGE_MIN_BLOCK", min_block)
    monkeypatch.setattr(ops, "_STAGE_MAX_BYTES", max_bytes)
    monkeypatch.setattr(ops, "_STAGE_TASK_BYTES", task_bytes)
    monkeypatch.setattr(ops, "_TASKS_PER_THREAD", tasks_per_thread)
    monkeypatch.setattr(ops, "_STAGE_MIN_COVERAGE", 0.0)
    g = torch.Generator().manual_seed(53)
    x = random_features((3, 21, 19, 23), dtype, g, ties=True)
    rois = random_rois(40, 3, 19, 23, 0.5, g).to(dtype)
    rois[3, 0] = -1.0  # invalid: every bin empty, never staged
    rois[4, 1:] = torch.tensor([60.0, 50.0, 80.0, 70.0], dtype=dtype)  # past the map: empty bins
    rois[5, 0] = 7.0  # batch index out of range
    check(backend, x, rois, (3, 4), 0.5)
    check(backend, x[:, 1::2, 2:, 1:], rois, (2, 2), 0.5)  # strided channels, storage offset
    check(backend, x.contiguous(memory_format=torch.channels_last), rois, (3, 4), 0.5)  # in place


def test_many_channels_few_rois(backend):
    """Work is split over channel blocks: one ROI, many channels, both layouts."""
    g = torch.Generator().manual_seed(23)
    x = random_features((1, 70, 6, 5), torch.float32, g, ties=True)
    rois = torch.tensor([[0, 0, 0, 4, 5]], dtype=torch.float32)
    for layout in LAYOUTS:
        check(backend, _layout(x, layout), rois, (2, 2), 1.0)


def test_thread_count_does_not_change_results(backend):
    g = torch.Generator().manual_seed(29)
    x = random_features((2, 8, 10, 10), torch.float32, g, ties=True)
    rois = random_rois(20, 2, 10, 10, 1.0, g).to(torch.float32)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, previous):
            torch.set_num_threads(threads)
            results.append(run_forward(backend, x, rois, (3, 3), 1.0))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# ---------------------------------------------------------------------------------------------
# Backward


def _backward_inputs(dtype, g):
    x = random_features((2, 3, 7, 8), dtype, g, ties=True)
    rois = random_rois(9, 2, 7, 8, 1.0, g).to(dtype)
    return x, rois


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(31)
    x, rois = _backward_inputs(dtype, g)
    _, argmax = run_forward(backend, x, rois, (3, 3), 1.0)
    grad_output = torch.randn(argmax.shape, generator=g, dtype=torch.float64).to(dtype)
    batch = rois[:, 0].to(torch.float64).trunc().to(torch.int64)
    grad = backend.backward(grad_output, argmax, batch, tuple(x.shape), dtype)
    assert grad.dtype == dtype and grad.shape == x.shape and grad.is_contiguous()
    expected = reference_roi_pool_backward(grad_output, argmax, rois, x.shape)
    # One rounding of the float64 sum (float32 accumulation for 16-bit, so allow a few ulps).
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(grad.to(torch.float64), expected, rtol=tolerance, atol=tolerance)


def test_backward_accumulates_half_in_float32(backend):
    """2048 + 1 + 1 in float16 stays 2048 step by step; accumulated in float32 it is 2050."""
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float16)
    argmax = torch.zeros(3, 1, 1, 1, dtype=torch.int32)
    grad_output = torch.tensor([2048.0, 1.0, 1.0], dtype=torch.float16).view(3, 1, 1, 1)
    batch = torch.zeros(3, dtype=torch.int64)
    grad = backend.backward(grad_output, argmax, batch, tuple(x.shape), torch.float16)
    assert grad.item() == 2050.0


def test_backward_zero_strides_and_determinism(backend):
    g = torch.Generator().manual_seed(37)
    x, rois = _backward_inputs(torch.float32, g)
    _, argmax = run_forward(backend, x, rois, (4, 4), 1.0)
    grad_output = torch.tensor(0.1).expand(argmax.shape)  # all strides zero
    batch = rois[:, 0].trunc().to(torch.int64)
    first = backend.backward(grad_output, argmax, batch, tuple(x.shape), torch.float32)
    for _ in range(3):
        again = backend.backward(grad_output, argmax, batch, tuple(x.shape), torch.float32)
        assert torch.equal(first.view(torch.int32), again.view(torch.int32))
    expected = reference_roi_pool_backward(grad_output, argmax, rois, x.shape)
    torch.testing.assert_close(first.to(torch.float64), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_bytes", [1, 2**30], ids=["one-channel", "all-channels"])
def test_backward_block_does_not_change_results(backend, monkeypatch, block_bytes):
    """Backward tasks own (image, channel block)s; every block size sums in the same order."""
    from roi_ops_numba import ops

    g = torch.Generator().manual_seed(41)
    x = random_features((3, 11, 6, 7), torch.float32, g, ties=True)
    rois = random_rois(25, 3, 6, 7, 1.0, g).to(torch.float32)
    _, argmax = run_forward(backend, x, rois, (3, 3), 1.0)
    grad_output = torch.randn(argmax.shape, generator=g)
    batch = rois[:, 0].trunc().to(torch.int64)
    default = backend.backward(grad_output, argmax, batch, tuple(x.shape), torch.float32)
    monkeypatch.setattr(ops, "_BACKWARD_BLOCK_BYTES", block_bytes)
    blocked = backend.backward(grad_output, argmax, batch, tuple(x.shape), torch.float32)
    assert torch.equal(default.view(torch.int32), blocked.view(torch.int32))
    expected = reference_roi_pool_backward(grad_output, argmax, rois, x.shape)
    torch.testing.assert_close(blocked.to(torch.float64), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Differential test

_SPECIAL_COORDS = [-1e30, -7.5, -2.5, -0.5, 0.0, 0.5, 1.5, 2.5, 3.0, 7.5, 11.5, 1e30]


@st.composite
def _cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rois_dtype = dtype
    if dtype in (torch.float16, torch.bfloat16) and draw(st.booleans()):
        rois_dtype = torch.float32
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    ph, pw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1 / 16, 0.25, 0.5, 1.0, 2.0]))
    coord = st.one_of(
        st.sampled_from(_SPECIAL_COORDS),
        st.floats(-4 / scale, (max(h, w) + 4) / scale, allow_nan=False),
        st.integers(-2, 2 * max(h, w)).map(lambda v: v / 2 / scale),  # exact .5 products
    )
    batch = st.one_of(st.integers(0, n - 1).map(float), st.sampled_from([-1.0, n, 0.9, math.nan]))
    rows = draw(st.lists(st.tuples(batch, coord, coord, coord, coord), min_size=0, max_size=6))
    seed = draw(st.integers(0, 2**16))
    ties = draw(st.booleans())
    specials = draw(st.lists(st.sampled_from([math.nan, -math.inf, math.inf, -0.0]), max_size=3))
    layout = draw(st.sampled_from(LAYOUTS))
    return dtype, rois_dtype, (n, c, h, w), (ph, pw), scale, rows, seed, ties, specials, layout


@settings(max_examples=40, deadline=None)
@given(
    case=_cases(),
    stage_bytes=st.sampled_from([0, 100, 512 * 1024]),
    coverage=st.sampled_from([0.0, 0.5, math.inf]),
    min_block=st.sampled_from([1, 64]),
    task_bytes=st.sampled_from([0, 16 * 2**20]),
)
def test_differential(backend, case, stage_bytes, coverage, min_block, task_bytes):
    from roi_ops_numba import ops

    dtype, rois_dtype, shape, size, scale, rows, seed, ties, specials, layout = case
    g = torch.Generator().manual_seed(seed)
    x = random_features(shape, dtype, g, ties)
    flat = x.view(-1)
    for value in specials:
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = value
    rois = torch.tensor(rows, dtype=torch.float64).view(-1, 5).to(rois_dtype)
    knobs = ("_STAGE_BYTES", "_STAGE_MIN_COVERAGE", "_STAGE_MIN_BLOCK", "_STAGE_TASK_BYTES")
    defaults = [getattr(ops, name) for name in knobs]
    for name, value in zip(knobs, (stage_bytes, coverage, min_block, task_bytes), strict=True):
        setattr(ops, name, value)
    try:
        check(backend, _layout(x, layout), rois, size, scale)
    finally:
        for name, value in zip(knobs, defaults, strict=True):
            setattr(ops, name, value)
