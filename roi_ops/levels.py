"""Which pyramid level pools each ROI: torchvision's FPN level mapping, exactly.

`roi_levels` is torchvision's ``LevelMapper`` (eq. 1 of the FPN paper), computed with the same
torch operations in the same order on the same device, so every ROI gets the level torchvision
would give it. `level_range` and `infer_scales` are ``MultiScaleRoIAlign``'s scale set-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def level_range(spatial_scales: Sequence[float]) -> tuple[int, int]:
    """(k_min, k_max): the pyramid levels of the first (finest) and last scale, as torchvision
    computes them (``int(-log2(float32(scale)))``)."""
    first = -torch.log2(torch.tensor(spatial_scales[0], dtype=torch.float32)).item()
    last = -torch.log2(torch.tensor(spatial_scales[-1], dtype=torch.float32)).item()
    return int(first), int(last)


def roi_levels(
    rois: torch.Tensor,
    k_min: int,
    k_max: int,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> torch.Tensor:
    """(K,) int64 level index in [0, k_max - k_min] of each (K, 5) ROI row, or -1 where the
    level is not a number (a box inverted along one axis has a negative area; non-finite
    coordinates), where torchvision's loop over levels pools nothing.

    ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)``, clamped to
    [k_min, k_max], in the rois' dtype, as torchvision's ``LevelMapper`` does. No device
    synchronisation.
    """
    # torchvision's operations in its order, each rounding in the rois' dtype as there, but in
    # place after the first product: every launch adds to a call's device time.
    rois = rois.detach()
    sides = rois[:, 3:5] - rois[:, 1:3]  # x2 - x1, y2 - y1
    levels = sides[:, 0] * sides[:, 1]
    levels.sqrt_().div_(canonical_scale).log2_().add_(canonical_level)
    levels.add_(torch.tensor(eps, dtype=levels.dtype)).floor_()
    # NaN stays NaN through clamp; the integral levels minus k_min are exact in any float dtype.
    levels.clamp_(min=k_min, max=k_max).sub_(k_min).nan_to_num_(nan=-1.0)
    return levels.to(torch.int64)


def infer_scale(feature: torch.Tensor, original_size: Sequence[int]) -> float:
    """The scale 2^-k (k an integer) of a feature map of an image of `original_size` (H, W),
    as torchvision's ``MultiScaleRoIAlign`` infers it (from the heights)."""
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2 ** float(torch.tensor(approx).log2().round())


def infer_scales(
    features: Sequence[torch.Tensor], image_shapes: Sequence[tuple[int, int]]
) -> list[float]:
    """Every level's scale for images of `image_shapes` (their largest height and width),
    as torchvision's ``MultiScaleRoIAlign`` sets them up.

    Raises:
        ValueError: `image_shapes` is empty.
    """
    if not image_shapes:
        raise ValueError("image_shapes: expected at least one (height, width), got none")
    largest = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
    return [infer_scale(feature, largest) for feature in features]


def check_scales(spatial_scales: Sequence[float], num_levels: int) -> tuple[float, ...]:
    """Return the scales as floats; one per level, each finite and > 0, and spanning exactly
    `num_levels` consecutive pyramid levels (finest first).

    Raises:
        TypeError / ValueError naming ``spatial_scales``.
    """
    if not isinstance(spatial_scales, (list, tuple)) or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) for s in spatial_scales
    ):
        raise TypeError(
            f"spatial_scales: expected a list of floats, one per level, got {spatial_scales!r}"
        )
    scales = tuple(float(s) for s in spatial_scales)
    if len(scales) != num_levels:
        raise ValueError(
            f"spatial_scales: expected {num_levels} scales (one per feature level), got "
            f"{len(scales)}"
        )
    if not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"spatial_scales: expected finite numbers > 0, got {list(scales)}")
    k_min, k_max = level_range(scales)
    if k_max - k_min + 1 != num_levels:
        raise ValueError(
            f"spatial_scales: expected scales of {num_levels} consecutive pyramid levels, "
            f"finest first (e.g. 1/4, 1/8, 1/16, 1/32), got {list(scales)}, which span levels "
            f"{k_min} to {k_max}"
        )
    return scales
