"""torch.autocast: roi_pool runs on whatever the features come in as and returns that dtype."""

from __future__ import annotations

import pytest
import torch

import roi_ops
from roi_ops.testing import reference_roi_pool


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, images, rois):
        features = self.conv(images)  # autocast makes this float16/bfloat16
        return features, roi_ops.roi_pool(features, rois, 3, spatial_scale=0.5)


def _check(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Head().to(device)
    images = torch.randn(2, 3, 10, 12, device=device)
    rois = torch.tensor(
        [[0, 1.0, 2, 15, 18], [1, 0.5, 0.5, 22, 16], [1, 3, 3, 9, 9]], device=device
    )  # float32, as detection code produces them
    with torch.autocast(device_type=device, dtype=dtype):
        features, pooled = model(images, rois)
        assert features.dtype == dtype and pooled.dtype == dtype
        pooled.float().sum().backward()
    expected, _ = reference_roi_pool(features.detach().cpu(), rois.cpu(), 3, 0.5)
    assert torch.equal(pooled.detach().cpu(), expected)
    assert model.conv.weight.grad is not None and bool(model.conv.weight.grad.abs().sum() > 0)


def test_cpu_autocast_bfloat16():
    _check("cpu", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    _check("cuda", dtype)


# Boxes of another dtype under autocast (torchvision accepts any mix there) -------------------


def _features_and_boxes(device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 4, 11, 13, generator=g).to(device=device, dtype=dtype)
    boxes = torch.rand(7, 4, generator=g) * 40 - 4
    boxes[:, 2:] += boxes[:, :2].abs()
    batch = (torch.arange(7.0) % 2)[:, None]
    rois = torch.cat([batch, boxes], dim=1).to(device)
    return features, rois


def _boxes_dtype_under_autocast(device, autocast_dtype, features_dtype, boxes_dtype):
    features, rois = _features_and_boxes(device, features_dtype)
    geometry = torch.float64 if features_dtype == torch.float64 else torch.float32
    expected_rois = rois.to(boxes_dtype).to(geometry)  # the boxes' values, exactly
    expected = roi_ops.roi_pool(features, expected_rois, (3, 2), 0.25)
    leaf = features.clone().requires_grad_(True)
    with torch.autocast(device_type=device, dtype=autocast_dtype):
        got = roi_ops.roi_pool(leaf, rois.to(boxes_dtype), (3, 2), 0.25)
        per_image = [rois[rois[:, 0] == i, 1:].to(boxes_dtype) for i in range(2)]
        listed = roi_ops.roi_pool(features, boxes=per_image, output_size=(3, 2), spatial_scale=0.25)
    assert got.dtype == features_dtype and torch.equal(got, expected)
    order = torch.cat([torch.nonzero(rois[:, 0] == i)[:, 0] for i in range(2)])
    assert torch.equal(listed, expected[order])
    got.float().sum().backward()
    reference = features.clone().requires_grad_(True)
    roi_ops.roi_pool(reference, expected_rois, (3, 2), 0.25).float().sum().backward()
    assert torch.equal(leaf.grad, reference.grad)


@pytest.mark.parametrize("features_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("boxes_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_autocast_accepts_boxes_of_any_float_dtype(features_dtype, boxes_dtype):
    _boxes_dtype_under_autocast("cpu", torch.bfloat16, features_dtype, boxes_dtype)


def test_half_boxes_get_float32_geometry_under_autocast_only():
    # torchvision computes under autocast in float32; outside autocast float16 rois keep the
    # contract's float16 geometry. Large boxes at stride 16 make the two differ.
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(50, 4, generator=g) * 600
    boxes[:, 2:] += boxes[:, :2]
    half = torch.cat([torch.zeros(50, 1), boxes], dim=1).half()
    features = torch.randn(1, 2, 50, 60, generator=g).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = roi_ops.roi_pool(features, half, 7, 1 / 16)
    outside = roi_ops.roi_pool(features, half, 7, 1 / 16)
    assert torch.equal(inside, reference_roi_pool(features, half.float(), 7, 1 / 16)[0])
    assert torch.equal(outside, reference_roi_pool(features, half, 7, 1 / 16)[0])
    assert not torch.equal(inside, outside)


def test_mixed_dtypes_outside_autocast_still_raise():
    features, rois = _features_and_boxes("cpu", torch.float32)
    with pytest.raises(TypeError, match=r"rois: expected dtype float32 .* got float16"):
        roi_ops.roi_pool(features, rois.half(), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="rois"):
        roi_ops.roi_pool(features, rois.long(), 2)  # not a float dtype: still an error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("features_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("boxes_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_autocast_accepts_boxes_of_any_float_dtype(
    autocast_dtype, features_dtype, boxes_dtype
):
    _boxes_dtype_under_autocast("cuda", autocast_dtype, features_dtype, boxes_dtype)
