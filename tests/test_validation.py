"""Argument checks and value checks: every error names the argument and says what to do."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import small_inputs

import roi_ops
from roi_ops.testing import check_case, contract_cases, reference_roi_pool

BAD_CALLS = [
    (lambda x, r: roi_ops.roi_pool(x[0], r, 2), ValueError, r"4-D tensor.*input.unsqueeze\(0\)"),
    (lambda x, r: roi_ops.roi_pool(x.int(), r, 2), TypeError, r"dtype float16.*input.float\(\)"),
    (lambda x, r: roi_ops.roi_pool(x.tolist(), r, 2), TypeError, r"torch.as_tensor"),
    (lambda x, r: roi_ops.roi_pool(x.to_sparse(), r, 2), TypeError, r"input: expected a dense"),
    (lambda x, r: roi_ops.roi_pool(x, r.to_sparse(), 2), TypeError, r"rois: expected a dense"),
    (lambda x, r: roi_ops.roi_pool(x, r[:, :4], 2), ValueError, r"\(K, 5\).*one \(L, 4\) tensor"),
    (lambda x, r: roi_ops.roi_pool(x, r[0], 2), ValueError, r"rois: expected a \(K, 5\)"),
    (
        lambda x, r: roi_ops.roi_pool(x, r.float(), 2),
        TypeError,
        r"rois: expected dtype float64 \(input is float64\), got float32; convert it with "
        r"rois.to\(input.dtype\)",
    ),
    (
        lambda x, r: roi_ops.roi_pool(x, r.long(), 2),
        TypeError,
        r"got int64; convert it with rois.to\(input.dtype\)",
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
    (lambda x, r: roi_ops.roi_pool(x, ["box"], 2), TypeError, r"rois\[0\].*torch.tensor\(boxes"),
    (
        lambda x, r: roi_ops.roi_pool(x, r.tolist(), 2),
        TypeError,
        r"list of lists of numbers; build a tensor first: torch.tensor\(rois, dtype=input.dtype",
    ),
    (lambda x, r: roi_ops.roi_pool(x, "rois", 2), TypeError, r"rois: expected a \(K, 5\)"),
    (lambda x, r: roi_ops.roi_pool(x, r, 0), ValueError, r"output_size: expected each size >= 1"),
    (lambda x, r: roi_ops.roi_pool(x, r, (2, -1)), ValueError, r"output_size: expected each"),
    (lambda x, r: roi_ops.roi_pool(x, r, (2, 2, 2)), TypeError, r"output_size: expected an int"),
    (lambda x, r: roi_ops.roi_pool(x, r, 2.0), TypeError, r"output_size: expected an int"),
    (
        lambda x, r: roi_ops.roi_pool(x, r, 2, 0.0),
        ValueError,
        r"spatial_scale: expected a finite number > 0 .*got 0.0",
    ),
    (lambda x, r: roi_ops.roi_pool(x, r, 2, math.inf), ValueError, r"spatial_scale: expected"),
    (lambda x, r: roi_ops.roi_pool(x, r, 2, math.nan), ValueError, r"spatial_scale: expected"),
    (lambda x, r: roi_ops.roi_pool(x, r, 2, "1"), TypeError, r"spatial_scale: expected a real"),
    (lambda x, r: roi_ops.roi_pool(x, r, 2, backend=None), TypeError, r"backend: expected"),
    (
        lambda x, r: roi_ops.roi_pool(x, r.to("meta"), 2),
        ValueError,
        r"rois: expected a tensor on input's device cpu, got meta; move it with "
        r"rois.to\(input.device\)",
    ),
    (lambda x, r: roi_ops.RoIPool(0), ValueError, r"output_size"),
]


@pytest.mark.parametrize("call,error,message", BAD_CALLS)
def test_bad_arguments_are_named_with_a_fix(call, error, message):
    x, rois = small_inputs()
    with pytest.raises(error, match=message):
        call(x, rois)


def test_plane_too_large_for_int32_argmax():
    x = torch.empty((1, 1, 2**16, 2**15), device="meta")
    with pytest.raises(ValueError, match=r"input: expected H \* W < 2\^31"):
        roi_ops.roi_pool(x, torch.zeros(1, 5, device="meta"), 2)


@pytest.mark.parametrize(
    "row,message",
    [
        ([2.0, 0, 0, 3, 3], r"row 1 = \[2.0, .*batch index 2 outside \[0, 2\) \(N=2\)"),
        ([-1.0, 0, 0, 3, 3], r"row 1 = \[-1.0, .*batch index -1 outside"),
        ([0.0, math.nan, 0, 3, 3], r"row 1 = \[0.0, nan, .*non-finite value"),
        ([1.0, 0, 0, math.inf, 3], r"row 1 = \[1.0, 0.0, 0.0, inf, 3.0\].*non-finite value"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_value_checks_name_the_first_bad_row_at_the_call_on_cpu(row, message, backend):
    x, rois = small_inputs(k=3)
    rois[1] = torch.tensor(row)
    rois[2] = torch.tensor([5.0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match=message):
        roi_ops.roi_pool(x, rois, 2, backend=backend)
    with roi_ops.value_checks(False):
        out = roi_ops.roi_pool(x, rois, 2, backend=backend)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    assert torch.equal(out[:1], reference_roi_pool(x, rois[:1], 2)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_hostile_value_is_caught_on_cpu(dtype):
    x, rois = small_inputs(dtype, k=4)
    hostile = [math.nan, math.inf, -math.inf]
    for column in range(5):
        for value in hostile + ([2.0, -1.0, 1e30] if column == 0 else []):
            bad = rois.clone()
            bad[2, column] = value
            with pytest.raises(ValueError, match=r"row 2 = "):
                roi_ops.roi_pool(x, bad, 2)


def test_value_check_modes_and_their_precedence(monkeypatch):
    x, rois = small_inputs(k=2)
    rois[0, 0] = 7
    monkeypatch.setenv("ROI_OPS_VALUE_CHECKS", "0")
    assert roi_ops.value_check_mode() == "off" and not roi_ops.value_checks_enabled()
    roi_ops.roi_pool(x, rois, 2)
    monkeypatch.setenv("ROI_OPS_VALUE_CHECKS", "Immediate")
    assert roi_ops.value_check_mode() == "immediate"
    monkeypatch.delenv("ROI_OPS_VALUE_CHECKS")
    assert roi_ops.value_check_mode() == "on"
    roi_ops.set_value_checks(False)
    try:
        roi_ops.roi_pool(x, rois, 2)
        with roi_ops.value_checks("immediate"), pytest.raises(ValueError, match="batch index"):
            roi_ops.roi_pool(x, rois, 2)
        with roi_ops.value_checks(True):
            assert roi_ops.value_check_mode() == "on"
    finally:
        roi_ops.set_value_checks(True)
    with pytest.raises(ValueError, match="batch index 7"):
        roi_ops.roi_pool(x, rois, 2)


@pytest.mark.parametrize("bad", ["sometimes", 2, None])
def test_value_check_mode_names_are_checked(bad):
    with pytest.raises(ValueError, match=r"mode: expected True, False, 'on', 'immediate'"):
        roi_ops.set_value_checks(bad)
    with pytest.raises(ValueError, match="mode: expected"):
        with roi_ops.value_checks(bad):
            pass


def test_check_errors_on_cpu_has_nothing_to_wait_for():
    roi_ops.check_errors("cpu")


# Results through the public call -----------------------------------------------------------


def test_worked_example_from_the_docs():
    x = (10 * torch.arange(6.0)[:, None] + torch.arange(6.0)).reshape(1, 1, 6, 6)
    out, argmax = roi_ops.roi_pool_with_argmax(x, torch.tensor([[0, 1.5, 0.5, 10.5, 6.4]]), 2, 0.5)
    assert out.flatten().tolist() == [13, 15, 33, 35]
    assert argmax.flatten().tolist() == [9, 11, 21, 23]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_backend_matches_reference_on_contract_cases(dtype):
    for case in contract_cases("cpu", dtype, seed=11):
        check_case(case, "torch")


def test_torch_backend_chunks_bound_memory(monkeypatch):
    import roi_ops.torch_backend as tb

    monkeypatch.setattr(tb, "CHUNK_ELEMENTS", 500)  # forces one ROI per chunk
    for case in contract_cases("cpu", torch.float32, seed=2):
        check_case(case, "torch")


def test_float_edge_last_bin_is_longer():
    x = torch.arange(64.0).reshape(1, 1, 64, 1)
    out, argmax = roi_ops.roi_pool_with_argmax(x, torch.tensor([[0.0, 0, 0, 0, 56]]), (7, 1))
    # bin_h = 57/7 in float32; ceil(7 * bin_h) = 58, so the last bin reaches row 57.
    assert argmax.flatten().tolist()[-1] == 57
    assert torch.equal(out, reference_roi_pool(x, torch.tensor([[0.0, 0, 0, 0, 56]]), (7, 1))[0])


def test_module_repr_and_call():
    module = roi_ops.RoIPool((7, 5), spatial_scale=1 / 16, backend="torch")
    assert repr(module) == "RoIPool(output_size=(7, 5), spatial_scale=0.0625, backend='torch')"
    x, rois = small_inputs()
    assert torch.equal(module(x, rois), roi_ops.roi_pool(x, rois, (7, 5), 1 / 16))


def test_list_and_tensor_rois_agree():
    x, rois = small_inputs()
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    ordered = torch.cat([rois[rois[:, 0] == i] for i in range(2)])
    assert torch.equal(roi_ops.roi_pool(x, per_image, 3), roi_ops.roi_pool(x, ordered, 3))


def test_meta_tensors_give_shapes():
    x, rois = small_inputs()
    out = roi_ops.roi_pool(x.to("meta"), rois.to("meta"), (3, 2))
    assert out.device.type == "meta" and out.shape == (6, 3, 3, 2)
    leaf = x.to("meta").requires_grad_(True)
    roi_ops.roi_pool(leaf, rois.to("meta"), 2).sum().backward()
    assert leaf.grad.shape == x.shape and leaf.grad.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_torch_backend_returns_the_first_maximal_element_itself(dtype):
    """Among equal maxima (-0.0 and 0.0) the output is the first one in scan order, bit for
    bit, not whichever amax returns."""
    from roi_ops.testing import RoiPoolCase, tie_heavy_features

    x = tie_heavy_features((2, 8, 40, 48), 4, dtype)  # float64 showed it at this size
    assert bool((x == 0).any()) and bool(torch.signbit(x[x == 0]).any())
    g = torch.Generator().manual_seed(5)
    boxes = torch.rand(30, 4, generator=g) * 40
    boxes[:, 2:] += boxes[:, :2]
    rois = torch.cat([torch.arange(30.0)[:, None] % 2, boxes], 1).to(dtype)
    check_case(RoiPoolCase("signed-zeros", x, rois, (3, 2), 1.0), "torch")
