"""multi_scale_roi_pool and MultiScaleRoIPool: exactly roi_pool per level, in box order."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_AND_CUDA

import roi_ops
from roi_ops.levels import infer_scales, level_range, levels_by_formula, roi_levels
from roi_ops.testing import reference_roi_pool, reference_roi_pool_backward

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _pyramid(dtype=torch.float64, n=2, c=3, height=48, width=64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    features = [
        torch.randn(n, c, height >> i, width >> i, generator=g, dtype=torch.float64).to(dtype)
        for i in range(len(SCALES))
    ]
    return [f.requires_grad_(requires_grad) for f in features]


def _rois(k=60, n=2, size=256.0, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(k, 4, generator=g, dtype=torch.float64) * size
    # log-uniform sizes so that every level gets boxes
    side = torch.exp(torch.rand(k, 1, generator=g, dtype=torch.float64) * 6.6) + 1
    aspect = torch.exp(torch.rand(k, 1, generator=g, dtype=torch.float64) - 0.5)
    sides = torch.cat([side * aspect, side / aspect], dim=1)
    boxes = torch.cat([corners[:, :2], corners[:, :2] + sides], dim=1)
    batch = torch.randint(0, n, (k, 1), generator=g).to(torch.float64)
    return torch.cat([batch, boxes], dim=1).to(dtype)


def _per_level_reference(features, rois, output_size, scales):
    """A Python loop over levels, as torchvision writes it, over the scalar reference."""
    levels = levels_by_formula(rois, *level_range(scales))
    channels = features[0].shape[1]
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    output = torch.zeros(rois.shape[0], channels, ph, pw, dtype=features[0].dtype)
    argmax = torch.full(output.shape, -1, dtype=torch.int32)
    for level, feature in enumerate(features):
        rows = (levels == level).nonzero().squeeze(1)
        if len(rows):
            out, arg = reference_roi_pool(feature.detach(), rois[rows], output_size, scales[level])
            output[rows], argmax[rows] = out, arg
    return output, argmax, levels


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("output_size", [7, (3, 5)])
def test_matches_roi_pool_level_by_level(backend, dtype, output_size):
    features = _pyramid(dtype)
    rois = _rois(dtype=torch.float32 if dtype == torch.float16 else dtype)
    expected, _, levels = _per_level_reference(features, rois, output_size, SCALES)
    assert len(set(levels.tolist())) == 4  # every level is used
    out = roi_ops.multi_scale_roi_pool(features, rois, output_size, SCALES, backend=backend)
    assert torch.equal(out, expected)


def test_levels_are_torchvisions():
    rois = torch.tensor(
        [
            [0, 0.0, 0, 224, 224],  # canonical: level 4 -> index 2
            [0, 0.0, 0, 112, 112],  # level 3 -> 1
            [0, 0.0, 0, 10, 10],  # clamped to 2 -> 0
            [0, 0.0, 0, 2000, 2000],  # clamped to 5 -> 3
            [0, 10.0, 0, 0, 20],  # inverted along x: no level
            [0, 200.0, 300, 0, 0],  # inverted along both: a positive area, level 4
        ]
    )
    assert roi_levels(rois, 2, 5).tolist() == [2, 1, 0, 3, -1, 2]


def _torchvision_level_mapper(rois, k_min, k_max, s0=224, lvl0=4, eps=1e-6):
    # torchvision's LevelMapper.__call__ and box_area, verbatim, with -1 where the level is NaN.
    boxes = rois[:, 1:5]
    s = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    target = torch.floor(lvl0 + torch.log2(s / s0) + torch.tensor(eps, dtype=s.dtype))
    target = torch.clamp(target, min=k_min, max=k_max)
    nan = torch.isnan(target)
    index = (torch.where(nan, k_min, target).to(torch.int64) - k_min).to(torch.int64)
    return torch.where(nan, -1, index)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
def test_levels_equal_torchvisions_formula_at_every_threshold(device, dtype):
    # Squares whose side steps one value of the dtype at a time across each level's threshold
    # (224 * 2^(k - 4): where eps and the rounding of every operation decide), random boxes,
    # zero, inverted and non-finite boxes.
    sides = []
    for k in range(1, 8):
        threshold = torch.tensor(224.0 * 2.0 ** (k - 4), dtype=dtype)
        step = torch.tensor(float("inf"), dtype=dtype)
        below = above = threshold
        for _ in range(24):
            below = torch.nextafter(below, -step)
            above = torch.nextafter(above, step)
            sides += [below, above]
        sides.append(threshold)
    side = torch.stack(sides).to(torch.float64)
    origin = torch.full_like(side, 3.0)
    squares = torch.stack([torch.zeros_like(side), origin, origin, origin + side, origin + side], 1)
    special = torch.tensor(
        [
            [0, 5.0, 5, 5, 5],  # zero area: log2(0) = -inf, the finest level
            [0, 10.0, 0, 0, 20],  # inverted along x: no level
            [0, 200.0, 300, 0, 0],  # inverted along both: level 4
            [0, float("nan"), 0, 10, 10],
            [0, 0, 0, float("inf"), 10],
            [0, float("-inf"), 0, 10, 10],
        ],
        dtype=torch.float64,
    )
    rois = torch.cat([squares.to(dtype).to(torch.float64), special, _rois(k=400, seed=7)])
    rois = rois.to(dtype).to(device)
    for k_min, k_max in [(2, 5), (0, 7), (3, 3)]:
        expected = _torchvision_level_mapper(rois, k_min, k_max)
        assert torch.equal(roi_levels(rois, k_min, k_max), expected)


def test_rows_without_a_level_are_zero_and_get_no_gradient():
    features = _pyramid(requires_grad=True)
    rois = _rois(k=8)
    rois[3, 3] = rois[3, 1] - 5  # inverted along x
    out = roi_ops.multi_scale_roi_pool(features, rois, 2, SCALES)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    out.sum().backward()
    assert all(f.grad is not None for f in features)


def test_list_boxes_and_box_order():
    features = _pyramid()
    rois = _rois(k=30)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    ordered = torch.cat([rois[rois[:, 0] == i] for i in range(2)])
    assert torch.equal(
        roi_ops.multi_scale_roi_pool(features, per_image, 3, SCALES),
        roi_ops.multi_scale_roi_pool(features, ordered, 3, SCALES),
    )


def test_gradients_match_the_reference_per_level(call_path):
    features = _pyramid(requires_grad=True)
    rois = _rois()
    out = roi_ops.multi_scale_roi_pool(features, rois, 3, SCALES)
    grad_output = torch.randn(out.shape, dtype=out.dtype)
    out.backward(grad_output)
    _, argmax, levels = _per_level_reference(features, rois, 3, SCALES)
    for level, feature in enumerate(features):
        mask = (levels == level)[:, None, None, None]
        expected = reference_roi_pool_backward(
            grad_output * mask, torch.where(mask, argmax, -1), rois, tuple(feature.shape)
        )
        assert torch.equal(feature.grad, expected)


def test_gradcheck_and_gradgradcheck(call_path):
    features = _pyramid(n=1, c=2, height=16, width=16, requires_grad=True)
    rois = _rois(k=10, n=1, size=60.0)

    def pool(*levels):
        return roi_ops.multi_scale_roi_pool(list(levels), rois, 2, SCALES)

    assert torch.autograd.gradcheck(pool, tuple(features))
    assert torch.autograd.gradgradcheck(pool, tuple(features))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    features = [f.to(device) for f in _pyramid(torch.float32)]
    rois = _rois(dtype=torch.float32).to(device)
    compiled = torch.compile(
        lambda f, r: roi_ops.multi_scale_roi_pool(f, r, 3, SCALES) * 2, fullgraph=True
    )
    assert torch.equal(
        compiled(features, rois), roi_ops.multi_scale_roi_pool(features, rois, 3, SCALES) * 2
    )


def test_one_level_is_roi_pool():
    (feature,) = _pyramid()[:1]
    rois = _rois()
    assert torch.equal(
        roi_ops.multi_scale_roi_pool([feature], rois, 3, [0.25]),
        roi_ops.roi_pool(feature, rois, 3, 0.25),
    )


def test_module_infers_scales_like_torchvision():
    features = _pyramid()
    x = {"p2": features[0], "p3": features[1], "p4": features[2], "p5": features[3], "x": 1}
    module = roi_ops.MultiScaleRoIPool(["p2", "p3", "p4", "p5"], 3)
    boxes = [_rois(k=5)[:, 1:], _rois(k=4, seed=2)[:, 1:]]
    out = module(x, boxes, [(192, 256), (180, 250)])
    assert module.scales == SCALES == infer_scales(features, [(192, 256)])
    assert torch.equal(out, roi_ops.multi_scale_roi_pool(features, boxes, 3, SCALES))
    assert "featmap_names=['p2', 'p3', 'p4', 'p5']" in repr(module)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda f, r: roi_ops.multi_scale_roi_pool(f[0], r, 2, SCALES), TypeError, "features:"),
        (lambda f, r: roi_ops.multi_scale_roi_pool(f, r, 2, SCALES[:3]), ValueError, "4 scales"),
        (
            lambda f, r: roi_ops.multi_scale_roi_pool(f, r, 2, [1 / 4, 1 / 8, 1 / 32, 1 / 64]),
            ValueError,
            "consecutive pyramid levels",
        ),
        (
            lambda f, r: roi_ops.multi_scale_roi_pool([f[0], f[1].float()] + f[2:], r, 2, SCALES),
            ValueError,
            r"features\[1\]: expected N=2, C=3, torch.float64",
        ),
        (lambda f, r: roi_ops.multi_scale_roi_pool(f, r[:, :4], 2, SCALES), ValueError, "rois"),
    ],
)
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call(_pyramid(), _rois())


def test_bad_rows_raise_at_the_call_on_cpu():
    rois = _rois(k=10)
    rois[6, 0] = 5
    with pytest.raises(ValueError, match=r"row 6 = \[5.0"):
        roi_ops.multi_scale_roi_pool(_pyramid(), rois, 2, SCALES)


class FusedTorch(roi_ops.Backend):
    """A fused multi-level backend built from torch ops (to test the fused path)."""

    name = "fused-torch"
    priority = -5
    device_types = frozenset({"cpu"})
    deterministic_backward = False

    def __init__(self):
        self.calls = []

    def forward(self, problem, output, argmax):
        from roi_ops.torch_backend import TorchBackend

        TorchBackend().forward(problem, output, argmax)

    def multi_scale_not_supported_reasons(self, problem):
        return []

    def forward_multi_scale(self, problem, output, argmax):
        self.calls.append("forward_multi_scale")
        for level in range(problem.num_levels):
            out = torch.empty_like(output)
            arg = None if argmax is None else torch.empty_like(argmax)
            rois = problem.rois.clone()
            rois[problem.levels != level, 0] = -1  # other levels' rows: invalid, zeros
            sub = roi_ops.RoIPoolProblem(
                problem.features[level],
                rois,
                problem.pooled_height,
                problem.pooled_width,
                problem.spatial_scales[level],
                argmax is not None,
            )
            self.forward(sub, out, arg)
            mine = (problem.levels == level)[:, None, None, None]
            output.copy_(out if level == 0 else torch.where(mine, out, output))
            if argmax is not None:
                argmax.copy_(arg if level == 0 else torch.where(mine, arg, argmax))

    def backward_multi_scale(self, problem):
        self.calls.append("backward_multi_scale")
        return None  # the shared scatter


def test_a_fused_backend_gets_one_call_per_direction():
    backend = roi_ops.register_backend(FusedTorch())
    try:
        features = _pyramid(requires_grad=True)
        rois = _rois()
        out = roi_ops.multi_scale_roi_pool(features, rois, 3, SCALES, backend="fused-torch")
        expected, _, _ = _per_level_reference(features, rois, 3, SCALES)
        assert torch.equal(out, expected)
        out.backward(torch.ones_like(out))
        grads = [f.grad.clone() for f in features]
        for f in features:
            f.grad = None
        roi_ops.multi_scale_roi_pool(features, rois, 3, SCALES, backend="torch").sum().backward()
        assert all(torch.equal(a, f.grad) for a, f in zip(grads, features, strict=True))
        assert backend.calls == ["forward_multi_scale", "backward_multi_scale"]
        torch.use_deterministic_algorithms(True)
        try:
            out = roi_ops.multi_scale_roi_pool(features, rois, 3, SCALES, backend="fused-torch")
            out.sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        assert backend.calls[-1] == "forward_multi_scale"  # its backward was not asked
    finally:
        roi_ops.unregister_backend("fused-torch")
