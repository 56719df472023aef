"""Shared pieces of the tests that compare roi_ops with torchvision (run by
scripts/test_torchvision.sh; every module skips where torchvision is not installed)."""

from __future__ import annotations

import torch

import roi_ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    """The roi_ops backends that `auto` may choose on `device` and that can run here."""
    return [
        info.name
        for info in roi_ops.list_backends()
        if info.available and (device in info.device_types or "*" in info.device_types)
    ]


def device_backend_pairs() -> list[tuple[str, str]]:
    return [(device, name) for device in DEVICES for name in backends_for(device)]


def torchvision_pool(x, rois, output_size, spatial_scale=1.0):
    """torchvision's (output, argmax) for a (K, 5) rois tensor."""
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)

    height, width = (output_size, output_size) if isinstance(output_size, int) else output_size
    return torch.ops.torchvision.roi_pool(x, rois, spatial_scale, height, width)


def random_case(seed: int, dtype: torch.dtype, device: str, k: int = 40):
    """Finite features with ties, and boxes of every kind: inside, crossing and outside the
    map, inverted, tiny and huge, with fractional coordinates and batch indices."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = 3, 5, int(torch.randint(1, 40, (1,), generator=g)), 17
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 3
    if seed % 2:
        x = x.round()  # ties: the first maximum in row-major order wins
    extent = torch.tensor([w, h, w, h], dtype=torch.float64) * 16
    boxes = torch.rand(k, 4, generator=g, dtype=torch.float64) * 1.4 * extent - 0.2 * extent
    halves = torch.rand(k, 4, generator=g) < 0.3
    boxes[halves] = (boxes[halves] * 2).round() / 2  # exact halves: C rounding away from zero
    batch = torch.randint(0, n, (k, 1), generator=g).double() + 0.5 * (seed % 3 == 0)
    rois = torch.cat([batch, boxes], dim=1)
    return x.to(device=device, dtype=dtype), rois.to(device=device, dtype=dtype)


def per_image(rois: torch.Tensor, num_images: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(list of (L_i, 4) boxes, the row order that list puts the rois in)."""
    index = rois[:, 0].trunc()
    order = torch.cat([torch.nonzero(index == i)[:, 0] for i in range(num_images)])
    return [rois[index == i, 1:] for i in range(num_images)], order
