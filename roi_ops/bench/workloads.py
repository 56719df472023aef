"""Named benchmark workloads and their deterministic inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Workload:
    """A detection-style roi_pool problem. Box sides are in image pixels."""

    name: str
    num_images: int
    channels: int
    height: int
    width: int
    num_rois: int
    output_size: int
    spatial_scale: float
    box_min: float
    box_max: float

    def scaled_for_cpu(self) -> Workload:
        """A smaller copy (fewer images, channels and ROIs) so a CPU sweep takes about a minute."""
        return replace(
            self,
            num_images=max(1, self.num_images // 4),
            channels=max(16, self.channels // 16),
            num_rois=max(32, self.num_rois // 32),
        )

    def describe(self) -> str:
        return (
            f"N={self.num_images} C={self.channels} {self.height}x{self.width} K={self.num_rois} "
            f"out={self.output_size} scale=1/{round(1 / self.spatial_scale)}"
        )


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("frcnn-c4", 2, 1024, 38, 63, 512, 7, 1 / 16, 16, 512),
        Workload("fpn-p2", 8, 256, 200, 272, 4096, 7, 1 / 4, 16, 112),
        Workload("fpn-p4", 8, 256, 50, 68, 4096, 7, 1 / 16, 64, 448),
        Workload("mask-14", 8, 256, 50, 68, 4096, 14, 1 / 16, 32, 512),
        Workload("big-batch", 16, 256, 100, 136, 16000, 7, 1 / 8, 16, 800),
        # Weakly supervised detection (WSDDN, OICR) on VGG16 conv5: 2,000 proposals per image.
        Workload("wsddn", 2, 512, 38, 63, 4000, 7, 1 / 16, 16, 600),
        # Tens of thousands of small boxes (1 to 16 feature cells a side) pooled to 3x3 on a
        # narrow map: point- and keypoint-style heads, dense proposals.
        Workload("many-small", 4, 64, 100, 136, 32000, 3, 1 / 8, 8, 128),
    )
}

# The per-call cost probe: a problem small enough that the host's time per call dominates.
SMALL_PROBLEM = Workload("small", 2, 256, 50, 68, 64, 7, 1 / 16, 16, 512)


def resolve_workloads(
    names: list[str] | None, device: torch.device, full_size: bool = False
) -> list[Workload]:
    """The named workloads (all by default), scaled down on the CPU unless `full_size`.

    Raises:
        KeyError: a name not in `WORKLOADS`.
    """
    chosen = [WORKLOADS[n] for n in names] if names else list(WORKLOADS.values())
    return [w.scaled_for_cpu() if device.type == "cpu" and not full_size else w for w in chosen]


def make_rois(workload: Workload, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """(K, 5) ROIs: log-uniform box sides, uniform positions inside the image, uniform batch."""
    g = torch.Generator().manual_seed(seed)
    k = workload.num_rois
    image_w = workload.width / workload.spatial_scale
    image_h = workload.height / workload.spatial_scale
    log_lo, log_hi = math.log(workload.box_min), math.log(workload.box_max)
    sides = torch.exp(
        log_lo + (log_hi - log_lo) * torch.rand(k, 2, generator=g, dtype=torch.float64)
    )
    box_w = torch.minimum(sides[:, 0], torch.tensor(image_w))
    box_h = torch.minimum(sides[:, 1], torch.tensor(image_h))
    x1 = torch.rand(k, generator=g, dtype=torch.float64) * (image_w - box_w)
    y1 = torch.rand(k, generator=g, dtype=torch.float64) * (image_h - box_h)
    batch = torch.randint(0, workload.num_images, (k,), generator=g).to(torch.float64)
    rois = torch.stack([batch, x1, y1, x1 + box_w, y1 + box_h], dim=1)
    return rois.to(dtype).to(device)


def make_input(
    workload: Workload, dtype: torch.dtype, device, seed: int = 0, channels_last: bool = False
) -> torch.Tensor:
    """(N, C, H, W) random normal features."""
    g = torch.Generator().manual_seed(seed + 1)
    shape = (workload.num_images, workload.channels, workload.height, workload.width)
    x = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
