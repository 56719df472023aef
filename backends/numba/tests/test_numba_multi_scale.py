"""The numba backend's fused multi-level (FPN) path: `forward_multi_scale` and
`backward_multi_scale` against the core's level-by-level result and the scalar reference, on
poisoned outputs; every dtype and layout, rows without a level, bad rows, serial and parallel."""

from __future__ import annotations

import math
import zlib

import pytest
import roi_ops
import torch
from numba_cases import DTYPES, make_backend, random_features
from roi_ops.backend import MultiScaleRoIPoolBackwardProblem, MultiScaleRoIPoolProblem
from roi_ops.bad_rois import EMPTY, decode, new_log, record_bad_rois
from roi_ops.levels import level_range, roi_levels
from roi_ops.testing import (
    DTYPE_PAIRS,
    assert_same_bits,
    check_with_and_without_argmax,
    dtype_id,
    poisoned_forward,
    reference_by_level,
)
from roi_ops.testing.reference import backward_error_bound, reference_roi_pool_backward

pytest.importorskip("numba")

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
# One layout per level, finest first: strided is a view with a storage offset, strided channels
# and a W stride of 2.
LAYOUTS = {
    "contiguous": ("contiguous",) * 4,
    "channels_last": ("channels_last",) * 4,
    "strided": ("strided",) * 4,
    "mixed": ("contiguous", "channels_last", "strided", "channels_last"),
}


def _level(shape, dtype, layout, g, ties):
    n, c, h, w = shape
    if layout == "strided":
        base = random_features((n, 2 * c + 1, h + 1, 2 * w), dtype, g, ties)
        return base[:, 1::2, 1:, ::2]
    x = random_features(shape, dtype, g, ties)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def pyramid(dtype, g, layouts=LAYOUTS["contiguous"], n=2, c=5, height=32, width=40, ties=False):
    """Four levels (N, C, height >> l, width >> l) of an image of (4 height, 4 width) pixels."""
    return tuple(
        _level((n, c, height >> level, width >> level), dtype, layout, g, ties)
        for level, layout in enumerate(layouts)
    )


def boxes(count, n, g, image=(128, 160), dtype=torch.float64):
    """(count, 5) rows with stratified log-uniform sides (20 or more rows give every level some),
    some past the image; row
    3 is inverted along x (no level) and row 4 along both axes (a level)."""
    height, width = image
    stratum = torch.randperm(count, generator=g).to(torch.float64)[:, None]
    spread = (stratum + torch.rand(count, 1, generator=g, dtype=torch.float64)) / count
    side = torch.exp(spread * 6.6) + 1  # log-uniform, stratified
    aspect = torch.exp(torch.rand(count, 1, generator=g, dtype=torch.float64) - 0.5)
    corner = torch.rand(count, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [width + 16.0, height + 16.0]
    ) - torch.tensor([16.0, 16.0])
    far = corner + torch.cat([side * aspect, side / aspect], dim=1)
    batch = torch.randint(0, n, (count, 1), generator=g).to(torch.float64)
    rois = torch.cat([batch, corner, far], dim=1)
    if count > 4:
        x1, x2 = rois[3, 1].item(), rois[3, 3].item()
        rois[3, 1], rois[3, 3] = x2 + 5, x1
        rois[4, 1:] = torch.tensor([90.0, 70.0, 10.0, 5.0])
    return rois.to(dtype)


def _levels(rois):
    return roi_levels(rois, *level_range(SCALES))


def run_multi(backend, features, rois, levels, size, needs_argmax=True, log=None):
    """`forward_multi_scale` on outputs poisoned with NaN and -7."""
    problem = MultiScaleRoIPoolProblem(
        features, rois, levels, size[0], size[1], SCALES, needs_argmax, log
    )
    assert backend.multi_scale_not_supported_reasons(problem) == []
    return poisoned_forward(backend, problem)


def reference_multi(features, rois, levels, size):
    """The scalar reference, level by level: row k from ``features[levels[k]]``."""
    return reference_by_level(features, rois, levels, size, SCALES)


def check_multi(backend, features, rois, levels, size):
    """Forward with and without argmax against the reference; returns (output, argmax)."""
    return check_with_and_without_argmax(
        lambda needs_argmax: run_multi(backend, features, rois, levels, size, needs_argmax),
        *reference_multi(features, rois, levels, size),
    )


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_id)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_matches_the_core_level_by_level(backend, dtypes, layout):
    """Row k is roi_pool of its level, bit for bit: against `roi_ops.multi_scale_roi_pool` on
    the torch backend (which loops over levels) and the scalar reference's argmax."""
    dtype, rois_dtype = dtypes
    g = torch.Generator().manual_seed(zlib.crc32(f"{dtypes}{layout}".encode()))
    features = pyramid(dtype, g, LAYOUTS[layout])
    rois = boxes(40, 2, g, dtype=rois_dtype)
    levels = _levels(rois)
    assert set(levels.tolist()) == {-1, 0, 1, 2, 3}
    core = roi_ops.multi_scale_roi_pool(features, rois, (3, 2), SCALES, backend="torch")
    output, _ = check_multi(backend, features, rois, levels, (3, 2))
    assert_same_bits(output, core)
    assert torch.equal(output[3], torch.zeros_like(output[3]))  # no level: zeros


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_level_assignment_and_ties(backend, dtype):
    """Levels need not follow the box sizes: each row is pooled from the level it is given
    (small boxes on coarse maps, large ones on fine maps), ties keep the first maximum, and
    levels outside [0, L) give zeros."""
    g = torch.Generator().manual_seed(7)
    features = pyramid(dtype, g, LAYOUTS["mixed"], c=3, ties=True)
    rois = boxes(36, 2, g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    levels = torch.randint(-1, 4, (36,), generator=g)
    levels[0], levels[1] = 4, -3  # outside [0, L): no level
    output, argmax = check_multi(backend, features, rois, levels, (2, 3))
    assert (argmax[:2] == -1).all() and not output[:2].any()


@pytest.mark.parametrize(
    "tuning",
    [
        {"stage_min_coverage": 0.0},
        {"stage_min_coverage": math.inf},
        {"stage_min_block": 1, "stage_task_bytes": 0, "tasks_per_thread": 1},
        {"stage_min_block": 3, "stage_task_bytes": 0, "tasks_per_thread": 1000},
        {"stage_max_bytes": 100},
        {"stage_max_bytes": 100, "stage_bytes": 0},
        {"stage_max_bytes": 100, "stage_bytes": 200, "min_block": 1},
        {"stage_min_coverage": 0.0, "stream_min_bytes": 0, "tasks_per_thread": 64},
    ],
    ids=["dense", "sparse", "one-channel", "many-groups", "per-roi", "gather", "bands", "streamed"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_every_kernel_path(schedule, tuning, dtype):
    """The tuning knobs that pick a path (grouped regions staged densely or per ROI, one
    channel per task, many groups, the per-ROI kernel with window, band or gathered reads,
    outputs written by non-temporal stores), on
    NCHW, channels_last and mixed levels, with bad rows and rows without a level among them."""
    backend = make_backend(schedule, **tuning)
    g = torch.Generator().manual_seed(11)
    for layout in ("contiguous", "channels_last", "mixed"):
        features = pyramid(dtype, g, LAYOUTS[layout], n=3, c=21, height=20, width=28, ties=True)
        rois = boxes(
            30, 3, g, image=(80, 112), dtype=torch.float32 if dtype != torch.float64 else dtype
        )
        rois[5, 0] = 7.0  # batch index out of range
        rois[6, 2] = math.nan
        check_multi(backend, features, rois, _levels(rois), (3, 4))


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_id)
def test_bad_rows_are_logged_as_by_one_level(backend, dtypes):
    """Bad rows (a batch index out of range, a non-finite value), on a level or without one,
    are recorded exactly as `roi_ops.bad_rois.record_bad_rois` records them, and give zeros."""
    dtype, rois_dtype = dtypes
    g = torch.Generator().manual_seed(13)
    features = pyramid(dtype, g)
    rois = boxes(24, 2, g, dtype=rois_dtype)
    rois[9, 0] = 2.0  # out of range, with a level
    rois[12, 3] = math.nan  # no level
    rois[14, 2] = -math.inf  # an infinite area: the coarsest level
    rois[15, 0] = -1.0
    levels = _levels(rois)
    assert levels[9] >= 0 and levels[12] == -1 and levels[14] == 3
    expected_log = new_log()
    record_bad_rois(expected_log, rois, 2)
    for needs_argmax in (True, False):
        log = new_log()
        output, _ = run_multi(backend, features, rois, levels, (2, 2), needs_argmax, log)
        assert torch.equal(log, expected_log)
        assert decode(log).row == 9
        assert not output[[9, 12, 14, 15]].any()
    expected, _ = reference_multi(features, rois, levels, (2, 2))
    assert_same_bits(output, expected)
    log = new_log()
    run_multi(backend, features, boxes(24, 2, g, dtype=rois_dtype), levels, (2, 2), True, log)
    assert (log == EMPTY).all()


def test_bad_rows_raise_right_after_the_call():
    """Through roi_ops on the CPU the log is read after the one call: the first bad row is
    named; with the value checks off such rows give zeros."""
    g = torch.Generator().manual_seed(17)
    features = pyramid(torch.float32, g)
    rois = boxes(20, 2, g, dtype=torch.float32)
    rois[8, 0] = 5.0
    rois[11, 1] = math.nan
    with pytest.raises(ValueError, match=r"row 8 = \[5.0"):
        roi_ops.multi_scale_roi_pool(features, rois, 2, SCALES, backend="numba")
    with roi_ops.value_checks(False):
        output = roi_ops.multi_scale_roi_pool(features, rois, 2, SCALES, backend="numba")
        core = roi_ops.multi_scale_roi_pool(features, rois, 2, SCALES, backend="torch")
    assert torch.equal(output, core) and not output[[8, 11]].any()


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (2, 0, 8, 8), (2, 3, 0, 8), (2, 3, 4, 8)])
def test_empty_maps(backend, shape):
    """No images (every row is bad), no channels, maps without rows, and a coarsest map
    without rows among others: the finest level is `shape`, the others halve it."""
    n, c, h, w = shape
    features = tuple(torch.ones(n, c, h >> level, w >> level) for level in range(4))
    rois = torch.tensor([[0, 0, 0, 30, 30], [0, 1, 1, 200, 200.0]])
    check_multi(backend, features, rois, _levels(rois), (2, 2))
    none = torch.zeros(0, 5)
    output, argmax = run_multi(
        backend, pyramid(torch.float32, torch.Generator()), none, none[:, 0].long(), (2, 2)
    )
    assert output.shape == (0, 5, 2, 2) and argmax.shape == (0, 5, 2, 2)


def test_schedule_reaches_the_kernels(monkeypatch, schedule):
    """The work estimate picks the kernels for the one pass: serial ones below
    `serial_work`, parallel ones otherwise; one kernel call per direction."""
    from roi_ops_numba import ops, pool_groups, pool_keys, scatter

    backend = make_backend(schedule)
    for dtype in (torch.float32, torch.float16):
        ops._warm_up(dtype)
    ops._warm_up(torch.float32, backward=True)
    calls = []
    for module in (pool_groups, pool_keys, scatter):
        for name in dir(module):
            if name.endswith(("_serial", "_parallel")):
                kernel = getattr(module, name)

                def counted(*arguments, kernel=kernel, name=name):
                    calls.append(name)
                    kernel(*arguments)

                monkeypatch.setattr(module, name, counted)
    g = torch.Generator().manual_seed(19)
    rois = boxes(30, 2, g, dtype=torch.float32)
    for dtype in (torch.float32, torch.float16):  # float16 widened to float32
        calls.clear()
        features = pyramid(dtype, g)
        _, argmax = check_multi(backend, features, rois, _levels(rois), (2, 2))
        assert calls == [f"pool_groups_{schedule}"] * 2
    calls.clear()
    problem = MultiScaleRoIPoolBackwardProblem(
        torch.randn(argmax.shape, generator=g), argmax, rois, _levels(rois),
        tuple(tuple(f.shape) for f in features), torch.float32,
        (torch.contiguous_format,) * 4,
    )  # fmt: skip
    backend.backward_multi_scale(problem)
    assert calls == [f"scatter_{schedule}"]


# Backward ------------------------------------------------------------------------------------


def _backward(backend, grad_output, argmax, rois, levels, features):
    problem = MultiScaleRoIPoolBackwardProblem(
        grad_output, argmax, rois, levels, tuple(tuple(f.shape) for f in features),
        features[0].dtype, (torch.contiguous_format,) * len(features),
    )  # fmt: skip
    return backend.backward_multi_scale(problem)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_id)
def test_backward_matches_the_reference_per_level(backend, dtypes):
    """Level l's gradient is the scatter of level l's rows: within the float error bound of the
    float64 reference, and bit for bit the numba one-level backward of those rows (the same sums
    in the same order; float16/bfloat16 summed in float32, rounded once)."""
    dtype, rois_dtype = dtypes
    g = torch.Generator().manual_seed(23)
    features = pyramid(dtype, g, ties=True)
    rois = boxes(40, 2, g, dtype=rois_dtype)
    rois[7, 0] = 9.0  # bad: adds nothing
    levels = _levels(rois)
    _, argmax = run_multi(backend, features, rois, levels, (3, 3))
    grad_output = torch.randn(argmax.shape, generator=g, dtype=torch.float64).to(dtype)
    grads = _backward(backend, grad_output, argmax, rois, levels, features)
    single = make_backend("serial")
    for level, (grad, feature) in enumerate(zip(grads, features, strict=True)):
        assert grad.dtype == dtype and grad.shape == feature.shape and grad.is_contiguous()
        mask = (levels == level)[:, None, None, None]
        mine = torch.where(mask, argmax, -1)
        expected = reference_roi_pool_backward(grad_output, mine, rois, feature.shape)
        bound = backward_error_bound(
            grad_output, mine, rois, feature.shape, torch.float32 if dtype in
            (torch.float16, torch.bfloat16) else dtype, dtype,
        )  # fmt: skip
        assert ((grad.to(torch.float64) - expected).abs() <= bound).all()
        rows = (levels == level).nonzero().squeeze(1)
        one = single.backward(
            roi_ops.RoIPoolBackwardProblem(
                grad_output[rows], argmax[rows], rois[rows], tuple(feature.shape), dtype
            )
        )
        assert_same_bits(grad, one)


def test_backward_sums_half_in_float32(backend):
    """2048 + 1 + 1 in float16 stays 2048 step by step; summed in float32 it is 2050."""
    features = tuple(torch.zeros(1, 1, 2, 2, dtype=torch.float16) for _ in range(2))
    argmax = torch.zeros(4, 1, 1, 1, dtype=torch.int32)
    grad_output = torch.tensor([2048.0, 1.0, 1.0, 3.0], dtype=torch.float16).view(4, 1, 1, 1)
    rois = torch.zeros(4, 5)
    levels = torch.tensor([1, 1, 1, 0])
    low, high = _backward(backend, grad_output, argmax, rois, levels, features)
    assert high.view(-1).tolist() == [2050.0, 0, 0, 0] and low.view(-1).tolist() == [3.0, 0, 0, 0]


@pytest.mark.parametrize("block_bytes", [1, 2**30], ids=["one-channel", "all-channels"])
def test_backward_is_deterministic(backend, block_bytes):
    """Every block size, thread count and the serial kernel sum in the same order; zero
    grad_output strides are read as given."""
    g = torch.Generator().manual_seed(29)
    features = pyramid(torch.float32, g, n=3, c=11, ties=True)
    rois = boxes(50, 3, g, dtype=torch.float32)
    levels = _levels(rois)
    _, argmax = run_multi(backend, features, rois, levels, (3, 3))
    for grad_output in (
        torch.randn(argmax.shape, generator=g),
        torch.tensor(0.1).expand(argmax.shape),
    ):
        reference = _backward(make_backend("serial"), grad_output, argmax, rois, levels, features)
        blocked = make_backend("parallel", backward_block_bytes=block_bytes)
        for _ in range(2):
            grads = _backward(blocked, grad_output, argmax, rois, levels, features)
            for grad, expected in zip(grads, reference, strict=True):
                assert torch.equal(grad.view(torch.int32), expected.view(torch.int32))


# Through roi_ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
def test_through_roi_ops_against_the_torch_loop(dtype, layout):
    """`roi_ops.multi_scale_roi_pool(backend="numba")` takes the fused path and gives the torch
    backend's level-by-level output and gradients (small-integer gradients: every sum is exact,
    so the order of the sums cannot differ), each gradient in its level's layout; also under
    torch.use_deterministic_algorithms, where numba's own backward still runs."""
    g = torch.Generator().manual_seed(31)
    features = pyramid(dtype, g, LAYOUTS[layout], ties=True)
    rois = boxes(40, 2, g, dtype=torch.float32 if dtype != torch.float64 else dtype)
    size = (3, 3)
    grad_output = torch.randint(-4, 5, (40, 5, *size), generator=g).to(dtype)
    results = {}
    for name in ("numba", "torch"):
        leaves = [f.detach().requires_grad_(True) for f in features]
        output = roi_ops.multi_scale_roi_pool(leaves, rois, size, SCALES, backend=name)
        output.backward(grad_output)
        results[name] = (output, [leaf.grad for leaf in leaves])
    (output, grads), (core, core_grads) = results["numba"], results["torch"]
    assert_same_bits(output, core)
    for grad, expected in zip(grads, core_grads, strict=True):
        assert_same_bits(grad, expected)
        assert grad.stride() == expected.stride()  # the layout the core wants for the level
    leaves = [f.detach().requires_grad_(True) for f in features]
    torch.use_deterministic_algorithms(True)
    try:
        roi_ops.multi_scale_roi_pool(leaves, rois, size, SCALES, backend="numba").backward(
            grad_output
        )
    finally:
        torch.use_deterministic_algorithms(False)
    for leaf, expected in zip(leaves, core_grads, strict=True):
        assert_same_bits(leaf.grad, expected)


def test_levels_without_a_common_base_are_declared_unsupported():
    """Levels whose first elements are not a whole number of elements apart cannot be
    addressed from one base: the fused path says why (roi_ops then loops over levels)."""
    backend = make_backend("serial")
    memory = bytearray(4 * 80 + 2)
    aligned = torch.frombuffer(memory, dtype=torch.float32, count=64).view(1, 1, 8, 8)
    odd = torch.frombuffer(memory, dtype=torch.float32, count=16, offset=258).view(1, 1, 4, 4)
    rois = torch.zeros(1, 5)
    problem = MultiScaleRoIPoolProblem(
        (aligned, odd), rois, torch.zeros(1, dtype=torch.int64), 2, 2, (0.25, 0.125), False
    )
    reasons = backend.multi_scale_not_supported_reasons(problem)
    assert reasons and "not aligned" in reasons[0]
    features = pyramid(torch.float32, torch.Generator())
    ok = MultiScaleRoIPoolProblem(
        features, rois, torch.zeros(1, dtype=torch.int64), 2, 2, SCALES, False
    )
    assert backend.multi_scale_not_supported_reasons(ok) == []


def test_the_fused_path_compiles_nothing_new():
    """One map and several levels share every specialisation: after one-map calls of a dtype,
    multi-level calls of it (any layout) load no more."""
    from roi_ops_numba import ops

    g = torch.Generator().manual_seed(37)
    rois = boxes(20, 2, g, dtype=torch.float32)
    for dtype in (torch.float32, torch.float16):
        x = random_features((2, 5, 16, 16), dtype, g).requires_grad_(True)
        roi_ops.roi_pool(x, rois, 2, 0.25, backend="numba").sum().backward()
    before = ops.compiled_signatures()
    for dtype in (torch.float32, torch.float16):
        for layout in ("contiguous", "mixed"):
            features = [f.requires_grad_(True) for f in pyramid(dtype, g, LAYOUTS[layout])]
            output = roi_ops.multi_scale_roi_pool(features, rois, 2, SCALES, backend="numba")
            output.sum().backward()
    assert ops.compiled_signatures() == before
