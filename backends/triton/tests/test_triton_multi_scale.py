"""The fused multi-level (FPN) kernels against roi_ops' level-by-level result (the core's loop
over the torch backend), bit for bit: every dtype, NCHW and channels_last, rows of no level,
bad rows and the bad-ROI log, the backward with integer gradients (exact in any order), and
what the backend declines to fuse. On a GPU (marked ``gpu``): the fpn-multi workload, and no
device synchronisation."""

from __future__ import annotations

import math

import pytest
import torch

import roi_ops
from roi_ops import bad_rois
from roi_ops.backend import MultiScaleRoIPoolBackwardProblem, MultiScaleRoIPoolProblem
from roi_ops.multi_scale import run_multi_forward
from roi_ops.testing import assert_same_bits, reference_roi_pool_backward

pytest.importorskip("triton")

from triton_cases import (  # noqa: E402
    CUDA,
    DEVICES,
    DTYPE_IDS,
    DTYPES,
    INTERPRET,
    LAYOUTS,
    MEMORY_FORMATS,
    embedded,
    in_layout,
    rois_dtype,
)

from roi_ops_triton import plan  # noqa: E402
from roi_ops_triton.backend import TritonBackend  # noqa: E402
from roi_ops_triton.tuning import Tuning  # noqa: E402

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
COMPILED_CUDA = pytest.mark.skipif(not CUDA or INTERPRET, reason="needs compiled kernels on CUDA")


def _pyramid(dtype, layout="contiguous", n=2, c=9, height=24, width=32, device="cpu", seed=0):
    """Levels finest first (24x32 .. 3x4 by default) in `layout`."""
    g = torch.Generator().manual_seed(seed)
    return [
        in_layout(torch.randn(n, c, height >> i, width >> i, generator=g).to(dtype), layout).to(
            device
        )
        for i in range(len(SCALES))
    ]


def _rois(k=24, n=2, dtype=torch.float32, device="cpu", seed=1):
    """Boxes inside a 96x128 image of every size, some past its border."""
    g = torch.Generator().manual_seed(seed)
    side = torch.exp(torch.rand(k, 1, generator=g, dtype=torch.float64) * 4.0) + 0.5
    aspect = torch.exp(torch.rand(k, 1, generator=g, dtype=torch.float64) - 0.5)
    x1 = torch.rand(k, 1, generator=g, dtype=torch.float64) * 140 - 10
    y1 = torch.rand(k, 1, generator=g, dtype=torch.float64) * 100 - 10
    batch = torch.randint(0, n, (k, 1), generator=g).to(torch.float64)
    boxes = torch.cat([batch, x1, y1, x1 + side * aspect, y1 + side / aspect], dim=1)
    return boxes.to(dtype).to(device)


def _levels(k=24, num_levels=4, device="cpu", seed=2):
    """Levels of every index, and -1 (no level) every seventh row."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, num_levels, (k,), generator=g)
    levels[3::7] = -1
    return levels.to(device)


def _fused_forward(features, rois, levels, size, needs_argmax=True, log=None, tuning=None):
    """The backend's fused forward on outputs poisoned with NaN and -7."""
    problem = MultiScaleRoIPoolProblem(
        features, rois, levels, size[0], size[1], SCALES[: len(features)], needs_argmax, log
    )
    backend = TritonBackend() if tuning is None else TritonBackend(tuning)
    assert backend.multi_scale_not_supported_reasons(problem) == []
    shape = problem.output_shape
    output = torch.full(shape, math.nan, dtype=features[0].dtype, device=rois.device)
    argmax = torch.full(shape, -7, dtype=torch.int32, device=rois.device) if needs_argmax else None
    backend.forward_multi_scale(problem, output, argmax)
    return output, argmax


def _level_by_level(features, rois, levels, size):
    """roi_ops' level-by-level result over the torch backend: (output, argmax); bad rows give
    zeros (value checks off)."""
    cpu = [f.detach().cpu() for f in features]
    with roi_ops.value_checks(False):
        return run_multi_forward(
            cpu, rois.cpu(), levels.cpu(), size[0], size[1], SCALES[: len(cpu)], "torch", True
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_forward_is_roi_pool_per_level(device, layout, dtype):
    features = _pyramid(dtype, layout, device=device)
    rois = _rois(dtype=rois_dtype(dtype), device=device)
    levels = _levels(device=device)
    size = (3, 2)
    expected, expected_argmax = _level_by_level(features, rois, levels, size)
    assert set(levels.tolist()) == {-1, 0, 1, 2, 3}
    output, argmax = _fused_forward(features, rois, levels, size)
    assert_same_bits(output, expected)
    assert torch.equal(argmax.cpu(), expected_argmax)
    inference, _ = _fused_forward(features, rois, levels, size, needs_argmax=False)
    assert_same_bits(inference, expected)
    no_level = levels.cpu() == -1
    assert not expected[no_level].any() and (expected_argmax[no_level] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_levels_read_through_views_and_two_levels(device, layout):
    """Levels inside NaN-filled buffers (a read past any edge shows), half-geometry rois, and
    fewer levels than the kernels take."""
    features = [embedded(f, layout) for f in _pyramid(torch.float16, layout, device=device)[:2]]
    rois = _rois(dtype=torch.float16, device=device)
    levels = _levels(num_levels=2, device=device)
    expected, expected_argmax = _level_by_level(features, rois, levels, (2, 2))
    output, argmax = _fused_forward(features, rois, levels, (2, 2))
    assert_same_bits(output, expected)
    assert torch.equal(argmax.cpu(), expected_argmax)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bad_rows_are_logged_as_the_single_level_kernels_log_them(device, layout):
    features = _pyramid(torch.float32, layout, device=device)
    rois = _rois(k=10, device=device)
    rois[2, 2] = math.inf  # the first bad row
    rois[4, 0] = 2.0  # batch index past N
    rois[6, 3] = math.nan
    levels = _levels(k=10, device=device)
    levels[4] = -1  # bad and without a level: still recorded
    log = bad_rois.new_log(device)
    output, argmax = _fused_forward(features, rois, levels, (2, 2), log=log)
    expected_log = bad_rois.new_log()
    bad_rois.record_bad_rois(expected_log, rois.cpu(), 2)
    assert torch.equal(log.cpu(), expected_log)
    expected, expected_argmax = _level_by_level(features, rois, levels, (2, 2))
    assert_same_bits(output, expected)
    assert torch.equal(argmax.cpu(), expected_argmax)
    for row in (2, 4, 6):
        assert not output[row].any() and (argmax[row] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.float32, torch.float64], ids=["float16", "float32", "float64"]
)
def test_fused_backward_is_the_scatter_per_level(device, layout, dtype):
    """Integer gradients, so the atomic sums are exact in any order; each level's gradient is
    the reference scatter of that level's rows."""
    features = _pyramid(dtype, layout, device=device)
    rois = _rois(dtype=rois_dtype(dtype), device=device)
    levels = _levels(device=device)
    size = (3, 2)
    _, argmax = _fused_forward(features, rois, levels, size)
    g = torch.Generator().manual_seed(4)
    grad = torch.randint(-3, 4, argmax.shape, generator=g).to(dtype).to(device)
    shapes = tuple(tuple(f.shape) for f in features)
    formats = (MEMORY_FORMATS[layout],) * len(features)
    problem = MultiScaleRoIPoolBackwardProblem(grad, argmax, rois, levels, shapes, dtype, formats)
    grads = TritonBackend().backward_multi_scale(problem)
    assert len(grads) == len(features)
    for level, (actual, shape) in enumerate(zip(grads, shapes, strict=True)):
        rows = (levels == level).nonzero().squeeze(1).cpu()
        wanted = reference_roi_pool_backward(
            grad.cpu()[rows], argmax.cpu()[rows], rois.cpu()[rows], shape
        )
        assert actual.shape == shape and actual.dtype == dtype
        assert_same_bits(actual.contiguous(), wanted.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_through_roi_ops_with_autograd(device, layout, monkeypatch):
    """roi_ops.multi_scale_roi_pool(backend="triton") runs fused (the single-level kernels are
    not called) and equals backend="torch", forward and backward (integer gradients), levels
    chosen by roi_ops."""

    def single_level(*args):
        raise AssertionError("a single-level kernel ran")

    monkeypatch.setattr(TritonBackend, "forward", single_level)
    monkeypatch.setattr(TritonBackend, "backward", single_level)
    features = _pyramid(torch.float32, layout, device=device)
    rois = _rois(k=30, device=device)
    rois[5, 1], rois[5, 3] = 40.0, 20.0  # inverted along x: no level
    leaves = [f.detach().requires_grad_(True) for f in features]
    reference = [f.detach().cpu().requires_grad_(True) for f in features]
    arguments = dict(output_size=(2, 3), spatial_scales=SCALES, canonical_scale=32)
    output = roi_ops.multi_scale_roi_pool(leaves, rois, backend="triton", **arguments)
    expected = roi_ops.multi_scale_roi_pool(reference, rois.cpu(), backend="torch", **arguments)
    assert_same_bits(output.detach(), expected.detach())
    grad = torch.randint(-3, 4, output.shape, generator=torch.Generator().manual_seed(5))
    output.backward(grad.to(device))
    expected.backward(grad)
    for leaf, wanted in zip(leaves, reference, strict=True):
        assert leaf.grad.is_contiguous(memory_format=MEMORY_FORMATS[layout])
        assert_same_bits(leaf.grad.contiguous(), wanted.grad.contiguous())


def test_what_the_backend_declines_to_fuse():
    """More levels than the kernels take, mixed or strided layouts, a level without pixels,
    roi_ops then pools level by level (through the single-level kernels)."""
    backend = TritonBackend()
    # CPU tensors run only under the interpreter; on a GPU machine the kernels take CUDA ones.
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def reasons(features, tuning=None):
        levels = torch.zeros(2, dtype=torch.int64, device=device)
        problem = MultiScaleRoIPoolProblem(
            features, _rois(k=2).to(device), levels, 2, 2, [1 / 4] * len(features), True
        )
        chosen = backend if tuning is None else TritonBackend(tuning)
        return chosen.multi_scale_not_supported_reasons(problem)

    x = torch.zeros(1, 8, 4, 4, device=device)
    last = x.contiguous(memory_format=torch.channels_last)
    assert reasons([x, x]) == [] and reasons([last, last]) == []
    too_many = reasons([x] * (plan.MAX_LEVELS + 1))
    assert len(too_many) == 1 and f"at most {plan.MAX_LEVELS}" in too_many[0]
    (mixed,) = reasons([x, last])
    assert "channels_last for levels [1], unit for levels [0]" in mixed
    strided = torch.zeros(1, 8, 4, 8, device=device)[..., ::2]
    assert "flat for levels [1]" in reasons([x, strided])[0]
    assert "levels [1] have no pixel" in reasons([x, torch.zeros(1, 8, 0, 4, device=device)])[0]
    assert reasons([x, x], Tuning(kernel="flat"))
    few_channels = torch.zeros(1, 4, 4, 4, device=device).contiguous(
        memory_format=torch.channels_last
    )
    assert reasons([few_channels, few_channels])  # the flat kernel's


@pytest.mark.parametrize("device", DEVICES)
def test_declined_calls_still_pool_level_by_level(device):
    """Mixed layouts: roi_ops loops over the levels through the backend's single-level kernels,
    with the same result."""
    features = _pyramid(torch.float32, device=device)
    features[1] = features[1].contiguous(memory_format=torch.channels_last)
    rois = _rois(k=12, device=device)
    arguments = dict(output_size=2, spatial_scales=SCALES, canonical_scale=32)
    output = roi_ops.multi_scale_roi_pool(features, rois, backend="triton", **arguments)
    cpu = [f.cpu() for f in features]
    expected = roi_ops.multi_scale_roi_pool(cpu, rois.cpu(), backend="torch", **arguments)
    assert_same_bits(output, expected)


# --------------------------------------------------------------------------------------------
# GPU: the fpn-multi workload
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@COMPILED_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_fpn_multi_matches_the_torch_backend(dtype):
    from roi_ops.bench.pyramid import FPN_MULTI, make_boxes, make_pyramid

    device = torch.device("cuda")
    features = [f.requires_grad_(True) for f in make_pyramid(FPN_MULTI, dtype, device)]
    rois = make_boxes(FPN_MULTI, torch.float32 if dtype == torch.bfloat16 else dtype, device)
    reference = [f.detach().clone().requires_grad_(True) for f in features]
    size, scales = FPN_MULTI.output_size, FPN_MULTI.spatial_scales
    output = roi_ops.multi_scale_roi_pool(features, rois, size, scales, backend="triton")
    expected = roi_ops.multi_scale_roi_pool(reference, rois, size, scales, backend="torch")
    assert_same_bits(output.detach(), expected.detach().cpu())
    grad = torch.randint(-3, 4, output.shape, device=device).to(dtype)
    output.backward(grad)
    expected.backward(grad)
    for leaf, wanted in zip(features, reference, strict=True):
        assert_same_bits(leaf.grad, wanted.grad.cpu())


@pytest.mark.gpu
@COMPILED_CUDA
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fpn_multi_runs_without_synchronising(layout):
    """Forward and backward through roi_ops with value checks on: no device synchronisation
    (torch raises on one under sync debug mode "error")."""
    from roi_ops.bench.pyramid import FPN_MULTI, make_boxes, make_pyramid

    device = torch.device("cuda")
    features = [
        in_layout(f, layout).requires_grad_(True)
        for f in make_pyramid(FPN_MULTI, torch.float32, device)
    ]
    rois = make_boxes(FPN_MULTI, torch.float32, device)
    size, scales = FPN_MULTI.output_size, FPN_MULTI.spatial_scales
    grad = torch.ones(FPN_MULTI.num_rois, FPN_MULTI.channels, size, size, device=device)
    for _ in range(2):  # the first call compiles and plans
        roi_ops.multi_scale_roi_pool(features, rois, size, scales, backend="triton").backward(grad)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        output = roi_ops.multi_scale_roi_pool(features, rois, size, scales, backend="triton")
        output.backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Planning and launches (recorded, not run)
# --------------------------------------------------------------------------------------------

H200 = (132, 60 * 2**20)  # (SMs, L2 bytes)


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, grid, arguments by name, cache key) of every launch, on an H200's sizes."""
    from roi_ops_triton import launch

    recorded = []

    def record(kernel, grid, args, meta, key):
        named = {**dict(zip(kernel.arg_names, args, strict=False)), **meta}
        recorded.append((kernel.__name__, grid, named, key))

    monkeypatch.setattr(launch.launch_cache, "launch", record)
    monkeypatch.setattr(launch, "device_sizes", lambda index: H200)
    return recorded


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fpn_multi_launches(launches, layout):
    """One forward and one backward launch for the bench's fpn-multi call (P2-P5, 8,000 ROIs)
    on an H200's sizes, with the single-level kernels' tiles; unused argument sets repeat
    level 0's."""
    from roi_ops.bench.pyramid import FPN_MULTI
    from roi_ops_triton.multi_scale import MultiScaleRunner

    w = FPN_MULTI
    features = [
        torch.empty(w.num_images, w.channels, math.ceil(w.image_height * s),
                    math.ceil(w.image_width * s), device="meta")
        for s in w.spatial_scales
    ]  # fmt: skip
    features = [in_layout(f, layout) for f in features]
    k, size = w.num_rois, w.output_size
    rois = torch.zeros(k, 5)
    levels = torch.zeros(k, dtype=torch.int64)
    runner = MultiScaleRunner()
    shape = (k, w.channels, size, size)
    out = torch.empty(shape, device="meta")
    arg = torch.empty(shape, dtype=torch.int32, device="meta")
    problem = MultiScaleRoIPoolProblem(features, rois, levels, size, size, w.spatial_scales, True)
    runner.forward(problem, out, arg)
    runner.forward(problem, out, arg)
    (name, grid, args, key), (_, _, _, again) = launches
    assert key == again and len(runner._forward_plans) == 1  # planned once
    assert args["LEVELS"] == 4 and args["num_warps"] == (8 if layout == "contiguous" else 4)
    if layout == "contiguous":
        assert name == "roi_pool_forward_unit_levels" and grid == (k, 13)
        assert (args["LANES"], args["CHANNELS"], args["chan_per_prog"]) == (256, 4, 20)
    else:
        assert name == "roi_pool_forward_channels_last_levels" and grid == (k, 8)
        assert (args["BLOCK_C"], args["BLOCK_B"], args["VEC"]) == (32, 64, 4)
    for level, feature in enumerate(features):
        assert (args[f"H{level}"], args[f"W{level}"]) == feature.shape[2:]
        assert args[f"s_h{level}"] == feature.stride(2)
        assert args[f"sf{level}"] == w.spatial_scales[level]
    assert args["H4"] == args["H0"] and args["inp4"] is args["inp0"] is features[0]

    grad = torch.empty(shape, device="meta")
    formats = (MEMORY_FORMATS[layout],) * 4
    shapes = tuple(tuple(f.shape) for f in features)
    backward = MultiScaleRoIPoolBackwardProblem(
        grad, arg, rois, levels, shapes, torch.float32, formats
    )
    grads = runner.backward(backward)
    name, grid, args, _ = launches[-1]
    assert name == "roi_pool_backward_scatter_levels" and grid == (k, 25)
    assert args["BLOCK"] == 512 and args["LEVELS"] == 4
    for level, (gradient, shape) in enumerate(zip(grads, shapes, strict=True)):
        n, c, h, w_ = shape
        assert gradient.shape == shape and args[f"grad{level}"] is gradient
        if gradient.is_contiguous():
            assert (args[f"s_gn{level}"], args[f"s_gc{level}"], args[f"s_gi{level}"]) == (
                c * h * w_, h * w_, 1,
            )  # fmt: skip
        else:
            assert gradient.is_contiguous(memory_format=torch.channels_last)
            assert (args[f"s_gn{level}"], args[f"s_gc{level}"], args[f"s_gi{level}"]) == (
                c * h * w_, 1, c,
            )  # fmt: skip


def test_few_rois_spread_channels_over_more_programs(launches):
    """As for one level: too few ROIs to fill the device split the channels further."""
    from roi_ops_triton.multi_scale import MultiScaleRunner

    features = [torch.empty(2, 256, 50 >> i, 68 >> i, device="meta") for i in range(3)]
    runner = MultiScaleRunner()
    for k in (4000, 4):
        problem = MultiScaleRoIPoolProblem(
            features, torch.zeros(k, 5), torch.zeros(k, dtype=torch.int64), 7, 7,
            SCALES[:3], False,
        )  # fmt: skip
        runner.forward(problem, torch.empty(problem.output_shape, device="meta"), None)
    (_, many_grid, many, many_key), (_, few_grid, few, few_key) = launches
    assert few_grid[1] > many_grid[1] and few["chan_per_prog"] < many["chan_per_prog"]
    assert many_key[0] is few_key[0] and len(runner._forward_plans) == 1
