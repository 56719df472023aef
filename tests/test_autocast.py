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
