"""The public API: validation errors, module, autograd, torch.compile, export, opcheck."""

from __future__ import annotations

import math

import pytest
import torch

import roi_ops
from roi_ops.config import env_flag
from roi_ops.eager import plain_eager
from roi_ops.ops import roi_pool_backward_op, roi_pool_op
from roi_ops.testing import check_case, contract_cases, reference_roi_pool

BACKEND = "torch"


def _inputs(dtype=torch.float64, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64).to(dtype)
    boxes = torch.rand(k, 4, generator=g, dtype=torch.float64) * 10
    boxes[:, 2:] += boxes[:, :2]
    batch = torch.arange(k, dtype=torch.float64)[:, None] % 2
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    return x, torch.cat([batch, boxes], dim=1).to(rois_dtype)


# Validation ---------------------------------------------------------------------------------

BAD_CALLS = [
    (lambda x, r: roi_ops.roi_pool(x[0], r, 2), ValueError, r"input: expected a 4-D tensor"),
    (lambda x, r: roi_ops.roi_pool(x.int(), r, 2), TypeError, r"input: expected dtype float16"),
    (lambda x, r: roi_ops.roi_pool(x.tolist(), r, 2), TypeError, r"input: expected a torch"),
    (lambda x, r: roi_ops.roi_pool(x.to_sparse(), r, 2), TypeError, r"input: expected a dense"),
    (lambda x, r: roi_ops.roi_pool(x, r.to_sparse(), 2), TypeError, r"rois: expected a dense"),
    (lambda x, r: roi_ops.roi_pool(x, r[:, :4], 2), ValueError, r"rois: expected a \(K, 5\)"),
    (lambda x, r: roi_ops.roi_pool(x, r[0], 2), ValueError, r"rois: expected a \(K, 5\)"),
    (
        lambda x, r: roi_ops.roi_pool(x, r.float(), 2),
        TypeError,
        r"rois: expected dtype float64 \(input is float64\), got float32",
    ),
    (
        lambda x, r: roi_ops.roi_pool(x.half(), r.double(), 2),
        TypeError,
        r"rois: expected dtype float16 or float32 \(input is float16\), got float64",
    ),
    (
        lambda x, r: roi_ops.roi_pool(x, [r[:, 1:]] * 3, 2),
        ValueError,
        r"rois: expected a list of at most N=2 tensors .* got 3",
    ),
    (lambda x, r: roi_ops.roi_pool(x, [r], 2), ValueError, r"rois\[0\]: expected an \(L, 4\)"),
    (lambda x, r: roi_ops.roi_pool(x, [r[:, 1:].float()], 2), TypeError, r"rois\[0\]: expected"),
    (lambda x, r: roi_ops.roi_pool(x, ["box"], 2), TypeError, r"rois\[0\]: expected an \(L, 4\)"),
    (lambda x, r: roi_ops.roi_pool(x, "rois", 2), TypeError, r"rois: expected a \(K, 5\)"),
    (lambda x, r: roi_ops.roi_pool(x, r, 0), ValueError, r"output_size: expected each size >= 1"),
    (lambda x, r: roi_ops.roi_pool(x, r, (2, -1)), ValueError, r"output_size: expected each"),
    (lambda x, r: roi_ops.roi_pool(x, r, (2, 2, 2)), TypeError, r"output_size: expected an int"),
    (lambda x, r: roi_ops.roi_pool(x, r, 2.0), TypeError, r"output_size: expected an int"),
    (
        lambda x, r: roi_ops.roi_pool(x, r, 2, 0.0),
        ValueError,
        r"spatial_scale: expected a finite number > 0, got 0.0",
    ),
    (lambda x, r: roi_ops.roi_pool(x, r, 2, math.inf), ValueError, r"spatial_scale: expected"),
    (lambda x, r: roi_ops.roi_pool(x, r, 2, math.nan), ValueError, r"spatial_scale: expected"),
    (lambda x, r: roi_ops.roi_pool(x, r, 2, "1"), TypeError, r"spatial_scale: expected a real"),
    (lambda x, r: roi_ops.roi_pool(x, r, 2, backend=None), TypeError, r"backend: expected"),
    (
        lambda x, r: roi_ops.roi_pool(x, r.to("meta"), 2),
        ValueError,
        r"rois: expected a tensor on input's device cpu, got meta",
    ),
    (lambda x, r: roi_ops.RoIPool(0), ValueError, r"output_size"),
]


@pytest.mark.parametrize("call,error,message", BAD_CALLS)
def test_bad_arguments_are_named(call, error, message):
    x, rois = _inputs()
    with pytest.raises(error, match=message):
        call(x, rois)


def test_plane_too_large_for_int32_argmax():
    x = torch.empty((1, 1, 2**16, 2**15), device="meta")
    with pytest.raises(ValueError, match=r"input: expected H \* W < 2\^31"):
        roi_ops.roi_pool(x, torch.zeros(1, 5, device="meta"), 2)


@pytest.mark.parametrize(
    "row,message",
    [
        ([2.0, 0, 0, 3, 3], r"batch indices in \[0, 2\) \(N=2\), got 2.0 in row 1"),
        ([-1.0, 0, 0, 3, 3], r"got -1.0 in row 1"),
        ([0.0, math.nan, 0, 3, 3], r"expected finite values, got row 1"),
        ([1.0, 0, 0, math.inf, 3], r"expected finite values, got row 1"),
    ],
)
def test_value_checks_name_the_first_bad_row(row, message):
    x, rois = _inputs(k=3)
    rois[1] = torch.tensor(row)
    rois[2] = torch.tensor([5.0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match=message):
        roi_ops.roi_pool(x, rois, 2)
    with roi_ops.value_checks(False):
        out = roi_ops.roi_pool(x, rois, 2)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))


@pytest.mark.parametrize(
    ("value", "on"),
    [(None, True), ("1", True), ("yes", True), ("0", False), (" OFF ", False), ("False", False),
     ("no", False)],
)  # fmt: skip
def test_env_flag_is_on_unless_turned_off(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("ROI_OPS_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("ROI_OPS_TEST_FLAG", value)
    assert env_flag("ROI_OPS_TEST_FLAG") is on


def test_value_check_switches(monkeypatch):
    x, rois = _inputs(k=2)
    rois[0, 0] = 7
    monkeypatch.setenv("ROI_OPS_VALUE_CHECKS", "0")
    assert not roi_ops.value_checks_enabled()
    roi_ops.roi_pool(x, rois, 2)
    monkeypatch.delenv("ROI_OPS_VALUE_CHECKS")
    roi_ops.set_value_checks(False)
    try:
        roi_ops.roi_pool(x, rois, 2)
        with roi_ops.value_checks(True), pytest.raises(ValueError, match="batch indices"):
            roi_ops.roi_pool(x, rois, 2)
    finally:
        roi_ops.set_value_checks(True)
    with pytest.raises(ValueError, match="batch indices"):
        roi_ops.roi_pool(x, rois, 2)


# Results ------------------------------------------------------------------------------------


def test_worked_example_from_the_docs():
    x = (10 * torch.arange(6.0)[:, None] + torch.arange(6.0)).reshape(1, 1, 6, 6)
    out, argmax = roi_ops.roi_pool_with_argmax(x, torch.tensor([[0, 1.5, 0.5, 10.5, 6.4]]), 2, 0.5)
    assert out.flatten().tolist() == [13, 15, 33, 35]
    assert argmax.flatten().tolist() == [9, 11, 21, 23]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_backend_matches_reference_on_contract_cases(dtype):
    for case in contract_cases("cpu", dtype, seed=11):
        check_case(case, BACKEND)


def test_torch_backend_chunks_bound_memory(monkeypatch):
    import roi_ops.torch_backend as tb

    monkeypatch.setattr(tb, "CHUNK_ELEMENTS", 500)  # forces one ROI per chunk
    for case in contract_cases("cpu", torch.float32, seed=2):
        check_case(case, BACKEND)


def test_float_edge_last_bin_is_longer():
    x = torch.arange(64.0).reshape(1, 1, 64, 1)
    out, argmax = roi_ops.roi_pool_with_argmax(x, torch.tensor([[0.0, 0, 0, 0, 56]]), (7, 1))
    # bin_h = 57/7 in float32; ceil(7 * bin_h) = 58, so the last bin reaches row 57.
    assert argmax.flatten().tolist()[-1] == 57
    assert torch.equal(out, reference_roi_pool(x, torch.tensor([[0.0, 0, 0, 0, 56]]), (7, 1))[0])


def test_module_repr_and_call():
    module = roi_ops.RoIPool((7, 5), spatial_scale=1 / 16, backend="torch")
    assert repr(module) == "RoIPool(output_size=(7, 5), spatial_scale=0.0625, backend='torch')"
    x, rois = _inputs()
    assert torch.equal(module(x, rois), roi_ops.roi_pool(x, rois, (7, 5), 1 / 16))


def test_list_and_tensor_rois_agree():
    x, rois = _inputs()
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    ordered = torch.cat([rois[rois[:, 0] == i] for i in range(2)])
    assert torch.equal(roi_ops.roi_pool(x, per_image, 3), roi_ops.roi_pool(x, ordered, 3))


def test_empty_rois_give_empty_output_and_gradient():
    x, _ = _inputs()
    x.requires_grad_(True)
    out = roi_ops.roi_pool(x, torch.empty(0, 5, dtype=x.dtype), 4)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# Autograd -----------------------------------------------------------------------------------


def test_gradcheck_and_gradgradcheck_float64():
    x, rois = _inputs()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: roi_ops.roi_pool(a, rois, (3, 2), 0.5), (x,))
    assert torch.autograd.gradgradcheck(lambda a: roi_ops.roi_pool(a, rois, (3, 2), 0.5), (x,))


@pytest.mark.parametrize("fast_path", ["1", "0"], ids=["eager-fast-path", "custom-op"])
def test_gradcheck_and_gradgradcheck_on_both_call_paths(fast_path, monkeypatch):
    monkeypatch.setenv("ROI_OPS_EAGER_FAST_PATH", fast_path)
    x, rois = _inputs()
    x.requires_grad_(True)
    assert plain_eager(x, rois) == (fast_path == "1")
    assert torch.autograd.gradcheck(lambda a: roi_ops.roi_pool(a, rois, (3, 2), 0.5), (x,))
    assert torch.autograd.gradgradcheck(lambda a: roi_ops.roi_pool(a, rois, (3, 2), 0.5), (x,))


def test_eager_fast_path_matches_the_custom_op(monkeypatch):
    x, rois = _inputs()
    results = {}
    for fast_path in ("1", "0"):
        monkeypatch.setenv("ROI_OPS_EAGER_FAST_PATH", fast_path)
        leaf = x.clone().requires_grad_(True)
        out = roi_ops.roi_pool(leaf, rois, (3, 2), 0.5)
        weight = torch.arange(out.numel(), dtype=x.dtype).reshape(out.shape).requires_grad_(True)
        (grad,) = torch.autograd.grad(out, leaf, weight, create_graph=True)
        (grad_grad,) = torch.autograd.grad(
            (grad * torch.arange(grad.numel()).view_as(grad)).sum(), weight
        )
        with torch.no_grad():
            inference = roi_ops.roi_pool(leaf, rois, (3, 2), 0.5)
        results[fast_path] = (out.detach(), grad.detach(), grad_grad, inference)
    for fast, slow in zip(results["1"], results["0"], strict=True):
        assert torch.equal(fast, slow)


def test_eager_fast_path_steps_aside_for_tracing_and_transforms():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, rois = _inputs()
    assert plain_eager(x, rois)
    with FakeTensorMode() as mode:
        fake_x, fake_rois = mode.from_tensor(x), mode.from_tensor(rois)
        assert not plain_eager(fake_x, fake_rois)
        assert roi_ops.roi_pool(fake_x, fake_rois, (3, 2), 0.5).shape == (rois.shape[0], 3, 3, 2)
    seen = []
    torch.vmap(lambda a: seen.append(plain_eager(a, rois)) or a)(x)
    assert seen == [False]


def test_no_gradient_without_argmax_on_the_fast_path():
    x, rois = _inputs()
    rois = rois.clone().requires_grad_(True)  # only the (non-differentiable) boxes need grad
    out = roi_ops.roi_pool(x, rois, (3, 2), 0.5)
    with pytest.raises(RuntimeError, match="without an argmax"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_accumulate_in_float32(dtype):
    # 300 overlapping ROIs push 300 gradients of 1/3 into one pixel: summing in half precision
    # would stall far from 100; accumulating in float32 and rounding once does not.
    x = torch.zeros(1, 1, 4, 4, dtype=dtype)
    x[0, 0, 1, 1] = 5
    x.requires_grad_(True)
    rois = torch.tensor([[0.0, 0, 0, 3, 3]] * 300, dtype=torch.float32)
    out = roi_ops.roi_pool(x, rois, 1)
    out.backward(torch.full_like(out, 1 / 3))
    expected = torch.tensor(300 * float(torch.tensor(1 / 3, dtype=dtype)), dtype=torch.float32)
    assert x.grad[0, 0, 1, 1] == expected.to(dtype)


def test_grad_output_with_zero_strides():
    x, rois = _inputs()
    x.requires_grad_(True)
    out = roi_ops.roi_pool(x, rois, 2)
    out.backward(torch.tensor(2.0, dtype=x.dtype).expand_as(out))
    _, argmax = reference_roi_pool(x.detach(), rois, 2)
    assert x.grad.sum() == 2 * (argmax >= 0).sum()


def test_deterministic_mode_gives_identical_gradients():
    x, rois = _inputs(torch.float32, k=40)
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            leaf = x.clone().requires_grad_(True)
            out = roi_ops.roi_pool(leaf, rois, 3, backend=BACKEND)
            out.backward(torch.linspace(-3, 3, out.numel()).reshape(out.shape))
            grads.append(leaf.grad)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])


def test_inference_skips_argmax():
    x, rois = _inputs()
    with torch.no_grad():
        output, argmax = roi_pool_op(x, rois, 2, 2, 1.0, "auto", False)
    assert argmax.numel() == 0 and output.shape == (6, 3, 2, 2)


def test_op_without_argmax_refuses_backward():
    x, rois = _inputs()
    x.requires_grad_(True)
    out, _ = roi_pool_op(x, rois, 2, 2, 1.0, "auto", False)
    with pytest.raises(RuntimeError, match="needs_argmax=False"):
        out.sum().backward()


# torch.library, torch.compile, torch.export -------------------------------------------------


def test_opcheck():
    x, rois = _inputs()
    torch.library.opcheck(roi_pool_op, (x.requires_grad_(True), rois, 3, 2, 0.5, "auto", True))
    torch.library.opcheck(roi_pool_op, (x.detach(), rois, 3, 2, 0.5, "auto", False))
    _, argmax = roi_ops.roi_pool_with_argmax(x, rois, (3, 2), 0.5)
    grad = torch.randn(argmax.shape, dtype=x.dtype, requires_grad=True)
    for channels_last in (False, True):  # the fake gradient's strides match the real one's
        torch.library.opcheck(
            roi_pool_backward_op,
            (grad, rois, argmax, 2, 3, 10, 12, torch.float64, "auto", channels_last),
        )


def test_compile_fullgraph_with_varying_roi_count():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    x, _ = _inputs(torch.float32)
    compiled = torch.compile(
        lambda a, b: roi_ops.roi_pool(a, b, 3, 0.5, backend=BACKEND) * 2, fullgraph=True
    )
    for k in (3, 5, 8, 13):
        _, rois = _inputs(torch.float32, k=k, seed=k)
        leaf = x.clone().requires_grad_(True)
        out = compiled(leaf, rois)
        out.sum().backward()
        expected = roi_ops.roi_pool(x.clone().requires_grad_(True), rois, 3, 0.5) * 2
        assert torch.equal(out, expected)
        ref_leaf = x.clone().requires_grad_(True)
        (roi_ops.roi_pool(ref_leaf, rois, 3, 0.5) * 2).sum().backward()
        assert torch.equal(leaf.grad, ref_leaf.grad)
    # One static graph, then one dynamic in K: no recompilation per ROI count after that.
    assert counters["stats"]["unique_graphs"] <= 2


def test_compile_list_rois():
    x, rois = _inputs(torch.float32)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    compiled = torch.compile(lambda a, b: roi_ops.roi_pool(a, b, 2), fullgraph=True)
    assert torch.equal(compiled(x, per_image), roi_ops.roi_pool(x, per_image, 2))


def test_export_with_dynamic_roi_count():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = roi_ops.RoIPool(3, 0.5)

        def forward(self, x, rois):
            return self.pool(x, rois).flatten(1).sum(1)

    x, rois = _inputs(torch.float32)
    k = torch.export.Dim("K", min=1)
    exported = torch.export.export(Head(), (x, rois), dynamic_shapes=({}, {0: k}))
    assert "roi_ops.roi_pool" in str(exported.graph)
    for count in (2, 9):
        _, other = _inputs(torch.float32, k=count, seed=count)
        assert torch.equal(exported.module()(x, other), Head()(x, other))
