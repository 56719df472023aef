"""Small input builders shared by the core's tests."""

from __future__ import annotations

import torch


def small_inputs(dtype=torch.float64, k=6, seed=0):
    """(x (2, 3, 10, 12), rois (k, 5)): random features and valid boxes, alternating images."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64).to(dtype)
    boxes = torch.rand(k, 4, generator=g, dtype=torch.float64) * 10
    boxes[:, 2:] += boxes[:, :2]
    batch = torch.arange(k, dtype=torch.float64)[:, None] % 2
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    return x, torch.cat([batch, boxes], dim=1).to(rois_dtype)
