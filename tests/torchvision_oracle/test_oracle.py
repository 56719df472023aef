"""Bit-equality with torchvision.ops.roi_pool on random finite inputs: outputs, argmax and
gradients, every backend that runs here, float16, float32 and float64 (float16 rois with
float16 features: half-precision geometry on both sides), tensor and list rois, several output
sizes, scales and memory layouts."""

from __future__ import annotations

import math

import pytest
import torch
from tv_support import device_backend_pairs, per_image, random_case, torchvision_pool

torchvision = pytest.importorskip("torchvision")
import roi_ops  # noqa: E402

PAIRS = device_backend_pairs()
SIZES = [1, 2, (3, 5), 7]
SCALES = [1.0, 0.5, 1 / 16, 0.3]


def _layouts(x: torch.Tensor):
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "transposed", x.transpose(2, 3).contiguous().transpose(2, 3)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_outputs_and_argmax_are_bit_identical(device, backend, dtype, seed):
    x, rois = random_case(seed, dtype, device)
    for size in SIZES:
        for scale in SCALES:
            expected, expected_argmax = torchvision_pool(x, rois, size, scale)
            for layout, features in _layouts(x):
                got, argmax = roi_ops.roi_pool_with_argmax(
                    features, rois, size, scale, backend=backend
                )
                where = f"{layout}, output_size={size}, spatial_scale={scale}"
                assert torch.equal(got, expected), where
                assert torch.equal(argmax.long(), expected_argmax.long()), where


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_list_rois_and_boxes_keyword_match(device, backend, dtype):
    x, rois = random_case(7, dtype, device)
    boxes, order = per_image(rois, x.shape[0])
    expected = torchvision.ops.roi_pool(x, boxes, (3, 4), 0.25)
    assert torch.equal(expected, torchvision_pool(x, rois[order], (3, 4), 0.25)[0])
    got = roi_ops.roi_pool(x, boxes=boxes, output_size=(3, 4), spatial_scale=0.25, backend=backend)
    assert torch.equal(got, expected)
    assert torch.equal(roi_ops.RoIPool((3, 4), 0.25, backend)(x, boxes), expected)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(3))
def test_gradients_are_bit_identical(device, backend, dtype, seed):
    x, rois = random_case(seed, dtype, device, k=60)
    for size, scale in ((2, 1.0), (7, 1 / 16), ((3, 5), 0.5)):
        ours = x.clone().requires_grad_(True)
        theirs = x.clone().requires_grad_(True)
        out = roi_ops.roi_pool(ours, rois, size, scale, backend=backend)
        # Small integers: every sum is exact, whatever order the scatter adds in.
        g = torch.Generator().manual_seed(seed)
        grad_output = torch.randint(-4, 5, out.shape, generator=g).to(out)
        out.backward(grad_output)
        torchvision.ops.roi_pool(theirs, rois, size, scale).backward(grad_output)
        assert torch.equal(ours.grad, theirs.grad), f"output_size={size}, scale={scale}"


@pytest.mark.parametrize("device,backend", PAIRS)
def test_hypothesis_drawn_cases_are_bit_identical(device, backend):
    hypothesis = pytest.importorskip("hypothesis")
    from roi_ops.testing import roi_pool_cases
    from roi_ops.testing.strategies import case_to_device

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
    @hypothesis.given(roi_pool_cases(dtypes=(torch.float32, torch.float64), allow_invalid=False))
    def check(case):
        case = case_to_device(case, device)
        features = torch.nan_to_num(case.input, nan=0.5, posinf=1e30, neginf=-1e30)
        expected, expected_argmax = torchvision_pool(
            features, case.rois_tensor(), case.output_size, case.spatial_scale
        )
        got, argmax = roi_ops.roi_pool_with_argmax(
            features, case.rois, case.output_size, case.spatial_scale, backend=backend
        )
        assert torch.equal(got, expected)
        assert torch.equal(argmax.long(), expected_argmax.long())

    check()


@pytest.mark.parametrize("device,backend", PAIRS)
def test_documented_differences_still_hold(device, backend):
    # docs/torchvision.md: NaN wins a bin in roi_ops and is skipped by torchvision; a bin of
    # only -inf is -inf (argmax at it) in roi_ops and -FLT_MAX (argmax -1) in torchvision.
    x = torch.arange(36.0, device=device).reshape(1, 1, 6, 6)
    x[0, 0, 0, 0] = math.nan
    x[0, 0, 4:, 4:] = -math.inf
    rois = torch.tensor([[0.0, 0, 0, 1, 1], [0.0, 4, 4, 5, 5]], device=device)
    got, argmax = roi_ops.roi_pool_with_argmax(x, rois, 1, backend=backend)
    expected, expected_argmax = torchvision_pool(x, rois, 1)
    assert got[0].isnan().all() and not expected[0].isnan().any()
    assert got[1].item() == -math.inf and argmax[1].item() == 28
    assert expected[1].item() == -torch.finfo(torch.float32).max and expected_argmax[1] == -1
