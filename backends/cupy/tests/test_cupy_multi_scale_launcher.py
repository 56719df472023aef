"""The CuPy backend's multi-level path end to end on the CPU: `roi_ops.multi_scale_roi_pool`
through the backend's methods and its `Launcher` (plan cache, pointers rewritten per call,
gradients allocated per level, dtypes and layouts), with the kernels run by the CPU emulator
instead of CuPy. Compared bit for bit with the torch backend's level-by-level loop."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import roi_ops
import torch
from cupy_harness import sizes
from roi_ops import multi_scale as multi_scale_module
from roi_ops.backend import MultiScaleRoIPoolBackwardProblem, MultiScaleRoIPoolProblem
from roi_ops.levels import level_range, roi_levels
from roi_ops.testing import assert_same_bits

pytest.importorskip("cupy")  # roi_ops_cupy.launch imports CuPy (it needs no device here)
from roi_ops_cupy import launch as launch_module  # noqa: E402
from roi_ops_cupy.backend import CupyBackend  # noqa: E402

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
NUM_IMAGES = 2


class EmulatedPackedLaunch:
    """`launch.PackedLaunch` with the emulator for cuLaunchKernel: each call writes its tensors'
    pointers into the planned arguments by name, as the real one does."""

    emulator = None  # set by the fixture
    built: list[str] = []

    def __init__(self, device: int, launch, tensor_names: tuple[str, ...]):
        self.plan = launch
        self.positions = tuple(launch.position(name) for name in tensor_names)
        EmulatedPackedLaunch.built.append(launch.name)

    def launch(self, device: int, tensors) -> None:
        args = list(self.plan.args)
        for position, tensor in zip(self.positions, tensors, strict=True):
            pointer = 0 if tensor is None else tensor.data_ptr()
            args[position] = (args[position][0], np.uint64(pointer))
        self.emulator.launch(replace(self.plan, args=tuple(args)))


class EmulatedCupy(CupyBackend):
    """The CuPy backend on CPU tensors: its methods and launcher, the emulator's kernels."""

    name = "cupy-emulated"
    priority = -10
    device_types = frozenset({"cpu"})

    def __init__(self):
        self.launcher = launch_module.Launcher()
        self.calls: list[str] = []

    def check_available(self) -> str | None:
        return None

    def forward(self, problem, output, argmax):
        self.launcher.forward(problem, output, argmax)

    def backward(self, problem):
        return self.launcher.backward(problem)

    def forward_multi_scale(self, problem, output, argmax):
        self.calls.append("forward_multi_scale")
        self.launcher.forward_multi_scale(problem, output, argmax)

    def backward_multi_scale(self, problem):
        self.calls.append("backward_multi_scale")
        return self.launcher.backward_multi_scale(problem)


@pytest.fixture
def backend(emulator, monkeypatch):
    """EmulatedCupy registered for one test, on a device of 4 SMs and a 1 MiB L2 (the
    channels_last gradients fit: written channels_last)."""
    monkeypatch.setattr(EmulatedPackedLaunch, "emulator", emulator)
    monkeypatch.setattr(EmulatedPackedLaunch, "built", [])
    monkeypatch.setattr(launch_module, "PackedLaunch", EmulatedPackedLaunch)
    monkeypatch.setattr(launch_module, "cuda_sizes", lambda device: sizes(4, 2**20))
    monkeypatch.setattr(launch_module, "_has_max_nan", lambda device: True)  # as the emulator
    registered = roi_ops.register_backend(EmulatedCupy())
    try:
        yield registered
    finally:
        roi_ops.unregister_backend(EmulatedCupy.name)


def _pyramid(dtype, layout, channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    shapes = [(NUM_IMAGES, channels, 48 >> i, 64 >> i) for i in range(len(SCALES))]
    return [
        torch.randn(shape, generator=g, dtype=torch.float64)
        .to(dtype)
        .contiguous(memory_format=fmt)
        .requires_grad_(True)
        for shape in shapes
    ]


def _boxes(rois_dtype, count=24, seed=1):
    """(K, 5) rows of every level: log-uniform sides of 8 to 600 pixels on 192 x 256 images, and
    a box inverted along x (no level)."""
    g = torch.Generator().manual_seed(seed)
    side = 8 * torch.exp(torch.rand(count, 1, generator=g, dtype=torch.float64) * np.log(75))
    corner = torch.rand(count, 2, generator=g, dtype=torch.float64) * 180
    batch = torch.randint(0, NUM_IMAGES, (count, 1), generator=g).double()
    rows = torch.cat([batch, corner, corner + side], 1)
    rows[5, 3] = rows[5, 1] - 10.0  # inverted along x
    return rows.to(rois_dtype)


def _pool(features, rois, backend, size=(3, 4)):
    return roi_ops.multi_scale_roi_pool(features, rois, size, SCALES, backend=backend)


CASES = [
    (torch.float32, torch.float32, "contiguous", 5),
    (torch.float64, torch.float64, "contiguous", 3),
    (torch.float16, torch.float32, "contiguous", 3),
    (torch.bfloat16, torch.bfloat16, "channels_last", 24),
    (torch.float32, torch.float32, "channels_last", 24),
]


@pytest.mark.parametrize("dtype, rois_dtype, layout, channels", CASES, ids=str)
def test_one_fused_call_per_direction_equals_the_torch_backend(
    backend, dtype, rois_dtype, layout, channels
):
    features = _pyramid(dtype, layout, channels)
    rois = _boxes(rois_dtype)
    out = _pool(features, rois, backend.name)
    assert backend.calls == ["forward_multi_scale"]
    expected = _pool(features, rois, "torch")
    assert_same_bits(out.detach(), expected.detach())
    assert bool(out.detach().ne(0).any())
    g = torch.Generator().manual_seed(2)
    grad = torch.randint(-3, 4, out.shape, generator=g).to(dtype)  # exact sums in any order
    grads = torch.autograd.grad(out, features, grad)
    assert backend.calls == ["forward_multi_scale", "backward_multi_scale"]
    expected_grads = torch.autograd.grad(expected, features, grad)
    for level, (actual, wanted, x) in enumerate(zip(grads, expected_grads, features, strict=True)):
        assert torch.equal(actual, wanted), f"level {level}"
        assert bool(wanted.ne(0).any()), f"level {level}"
        assert actual.dtype == dtype and actual.shape == x.shape
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        assert actual.is_contiguous(memory_format=fmt)
    assert sum(name.endswith(">") and "_levels<" in name for name in EmulatedPackedLaunch.built)


def test_plans_are_cached_and_take_each_calls_tensors(backend):
    features = _pyramid(torch.float32, "contiguous", 4, seed=3)
    rois = _boxes(torch.float32, seed=4)
    launcher = backend.launcher
    first = _pool(features, rois, backend.name).detach()
    other = [(x.detach() * -2).requires_grad_(True) for x in features]
    second = _pool(other, rois, backend.name).detach()
    assert len(launcher._forward_levels) == 1
    assert EmulatedPackedLaunch.built.count(EmulatedPackedLaunch.built[0]) == 1
    assert_same_bits(second, _pool(other, rois, "torch").detach())
    assert not torch.equal(first, second)


def test_deterministic_mode_uses_the_shared_scatter(backend):
    features = _pyramid(torch.float32, "contiguous", 3, seed=5)
    rois = _boxes(torch.float32, seed=6)
    torch.use_deterministic_algorithms(True)
    try:
        out = _pool(features, rois, backend.name)
        grads = torch.autograd.grad(out, features, torch.ones_like(out))
    finally:
        torch.use_deterministic_algorithms(False)
    assert backend.calls == ["forward_multi_scale"]  # its atomic backward was not asked
    expected = _pool(features, rois, "torch")
    expected_grads = torch.autograd.grad(expected, features, torch.ones_like(expected))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))


def test_bad_rows_raise_as_with_the_torch_backend(backend):
    features = [x.detach() for x in _pyramid(torch.float32, "contiguous", 3, seed=7)]
    for column, value in [(0, 2.0), (3, float("nan")), (0, -1.0)]:
        rois = _boxes(torch.float32, seed=8)
        rois[11, column] = value
        with pytest.raises(ValueError) as fused:
            _pool(features, rois, backend.name)
        with pytest.raises(ValueError) as looped:
            _pool(features, rois, "torch")
        assert str(fused.value) == str(looped.value)
        assert "11" in str(fused.value)


def test_no_rois_and_more_levels_than_the_table(backend):
    features = [x.detach() for x in _pyramid(torch.float32, "contiguous", 3)]
    empty = torch.zeros(0, 5)
    assert _pool(features, empty, backend.name).shape == (0, 3, 3, 4)
    levels = torch.zeros(0, dtype=torch.int64)
    nine = MultiScaleRoIPoolProblem([features[0]] * 9, empty, levels, 3, 4, (1.0,) * 9, True)
    assert backend.multi_scale_not_supported_reasons(nine) == [
        "9 pyramid levels (the fused kernels take at most 8)"
    ]
    four = MultiScaleRoIPoolProblem(features, empty, levels, 3, 4, SCALES, True)
    assert backend.multi_scale_not_supported_reasons(four) == []
    grads = backend.backward_multi_scale(
        MultiScaleRoIPoolBackwardProblem(
            torch.zeros(0, 3, 3, 4),
            torch.zeros(0, 3, 3, 4, dtype=torch.int32),
            empty,
            levels,
            [tuple(x.shape) for x in features],
            torch.float16,
            (torch.contiguous_format,) * 4,
        )
    )
    assert [g.shape for g in grads] == [x.shape for x in features]
    assert all(g.dtype == torch.float16 and not g.any() for g in grads)


@pytest.mark.parametrize("l2_bytes", [2**20, 2**16], ids=["fits-in-l2", "beyond-l2"])
def test_channels_last_gradients_are_written_channels_last_while_they_fit_in_l2(
    backend, monkeypatch, l2_bytes
):
    monkeypatch.setattr(launch_module, "cuda_sizes", lambda device: sizes(4, l2_bytes))
    features = [x.detach() for x in _pyramid(torch.float16, "channels_last", 24, seed=9)]
    rois = _boxes(torch.float32, seed=10)
    out, argmax = multi_scale_module.run_multi_forward(
        features, rois, _levels_of(rois), 3, 4, SCALES, "torch", True
    )
    grad = torch.randint(-3, 4, out.shape, generator=torch.Generator().manual_seed(11))
    formats = (torch.channels_last, torch.contiguous_format) * 2
    problem = MultiScaleRoIPoolBackwardProblem(
        grad.to(torch.float16), argmax, rois, _levels_of(rois),
        [tuple(x.shape) for x in features], torch.float16, formats,
    )  # fmt: skip
    grads = backend.backward_multi_scale(problem)
    fits = l2_bytes == 2**20  # 2 * 24 * 4080 float32 sums: 783 KB
    for grad_input, fmt in zip(grads, formats, strict=True):
        wanted = fmt if fits else torch.contiguous_format
        assert grad_input.dtype == torch.float16 and grad_input.is_contiguous(memory_format=wanted)
    expected = multi_scale_module.run_multi_backward(
        grad.to(torch.float16), rois, _levels_of(rois), argmax,
        [tuple(x.shape) for x in features], torch.float16, [False] * 4, "torch",
    )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))


def _levels_of(rois):
    return roi_levels(rois, *level_range(SCALES))


@pytest.mark.parametrize(
    "kernel",
    [launch_module.kernels.BACKWARD_PLANES, launch_module.kernels.BACKWARD_PLANES_GROUPED],
)
def test_single_level_planes_backward_through_the_launcher(backend, kernel):
    """`roi_ops.roi_pool` on one map through the launcher: the grouped planes backward queues
    the grouping launch before it and passes its buffer (two calls: the cached plan takes each
    call's tensors); gradients equal the torch backend's."""
    from roi_ops_cupy.tuning import DEFAULT_TUNING

    backend.launcher = launch_module.Launcher(replace(DEFAULT_TUNING, backward_kernel=kernel))
    g = torch.Generator().manual_seed(12)
    rois = _boxes(torch.float32, count=40, seed=13)  # row 5 inverted: no gradient
    for seed in (14, 15):
        x = torch.randn(NUM_IMAGES, 3, 24, 32, generator=torch.Generator().manual_seed(seed))
        x.requires_grad_(True)
        out = roi_ops.roi_pool(x, rois, (3, 4), 1 / 8, backend=backend.name)
        grad = torch.randint(-3, 4, out.shape, generator=g).float()  # exact sums in any order
        (actual,) = torch.autograd.grad(out, x, grad)
        expected = roi_ops.roi_pool(x, rois, (3, 4), 1 / 8, backend="torch")
        (wanted,) = torch.autograd.grad(expected, x, grad)
        assert_same_bits(out.detach(), expected.detach())
        assert torch.equal(actual, wanted) and bool(wanted.ne(0).any())
    grouped = kernel == launch_module.kernels.BACKWARD_PLANES_GROUPED
    built = EmulatedPackedLaunch.built
    assert any(name.startswith(kernel + "<") for name in built)
    assert any(name.startswith("roi_ops_group_rois<") for name in built) == grouped
    assert len(backend.launcher._backward) == 1


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("decided", [True, False], ids=["decided-yes", "decided-no"])
def test_single_level_inference_through_tables_of_maxima(backend, layout, decided, monkeypatch):
    """`roi_ops.roi_pool` inference on one map through the launcher with the tables of maxima
    (channels_last, and an NCHW map staged): the count and the build queued before the cvec
    kernel, one buffer a call (the decision's bytes, then the tables); outputs equal the torch
    backend's whether the device decides to build the tables or not (three calls, tie-heavy
    maps: the cached plan takes each call's tensors; an L2 smaller than the map)."""
    from roi_ops.testing import tie_heavy_features

    from roi_ops_cupy.tuning import DEFAULT_TUNING

    monkeypatch.setattr(launch_module, "cuda_sizes", lambda device: sizes(4, 2**16))
    tuning = replace(DEFAULT_TUNING, table_min_outputs=0, stage_channels_last=True)
    if not decided:
        tuning = replace(tuning, table_min_saved_reads=1e12)
    backend.launcher = launch_module.Launcher(tuning)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    rois = _boxes(torch.float32, count=30, seed=16)
    for seed in (17, 18, 19):
        x = tie_heavy_features((NUM_IMAGES, 24, 40, 48), seed, torch.float32)
        x = x.contiguous(memory_format=fmt)
        out = roi_ops.roi_pool(x, rois, (7, 7), 1 / 2, backend=backend.name)
        expected = roi_ops.roi_pool(x, rois, (7, 7), 1 / 2, backend="torch")
        assert_same_bits(out, expected)
    built = EmulatedPackedLaunch.built
    assert "roi_ops_table_savings<float>" in built and "roi_ops_max_tables<float>" in built
    assert any(name.startswith("roi_pool_forward_cvec") for name in built)
    (_, staged, _, tables), *_ = backend.launcher._forward.values()
    assert staged == (layout == "contiguous") and tables is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_staged_nchw_pyramid_equals_the_torch_backend(backend, dtype):
    """An NCHW pyramid staged (`planning.stages_pyramid`, forced here): each level copied
    channels_last by the copy kernel, then one launch of the cvec kernel over levels (two calls:
    the cached plan stages each call's levels). Outputs, inference and gradients (NCHW, as the
    levels) equal the torch backend's, on tie-heavy levels (NaN, -inf, signed zeros)."""
    from roi_ops.testing import tie_heavy_features

    from roi_ops_cupy.tuning import DEFAULT_TUNING

    tuning = replace(DEFAULT_TUNING, small_roi_outputs=0, stage_channels_last=True)
    backend.launcher = launch_module.Launcher(tuning)
    rois = _boxes(torch.float32, count=40, seed=20)
    for seed in (21, 22):
        features = [
            tie_heavy_features((NUM_IMAGES, 24, 48 >> i, 64 >> i), seed + i, dtype).requires_grad_(
                True
            )
            for i in range(len(SCALES))
        ]
        out = _pool(features, rois, backend.name)
        expected = _pool(features, rois, "torch")
        assert_same_bits(out.detach(), expected.detach())
        with torch.no_grad():
            assert_same_bits(_pool(features, rois, backend.name), expected.detach())
        grad = torch.randint(-3, 4, out.shape, generator=torch.Generator().manual_seed(seed))
        grads = torch.autograd.grad(out, features, grad.to(dtype))
        wanted = torch.autograd.grad(expected, features, grad.to(dtype))
        assert all(torch.equal(a, b) for a, b in zip(grads, wanted, strict=True))
        assert all(g.is_contiguous() and bool(g.ne(0).any()) for g in wanted)
    plans = list(backend.launcher._forward_levels.values())
    assert len(plans) == 2  # with and without the argmax
    for packed, copies in plans:
        assert packed.plan.name.startswith("roi_pool_forward_cvec_levels<")
        assert [copy.plan.name for copy in copies] == [launch_module.kernels.copy_name(dtype)] * 4
