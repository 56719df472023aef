"""Which pyramid level pools each ROI: torchvision's FPN level mapping, exactly.

`levels_by_formula` is torchvision's ``LevelMapper`` (eq. 1 of the FPN paper), computed with the
same torch operations in the same order on the same device, so every ROI gets the level
torchvision would give it. `roi_levels` gives the same levels; on CUDA it compares each box's
area with the smallest area of every level (`area_thresholds`, found once per device, dtype and
constants by running that formula on candidate areas, every one near each level's boundary),
which takes six kernels instead of twelve. `level_range` and `infer_scales` are
``MultiScaleRoIAlign``'s scale set-up.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch


def level_range(spatial_scales: Sequence[float]) -> tuple[int, int]:
    """(k_min, k_max): the pyramid levels of the first (finest) and last scale, as torchvision
    computes them (``int(-log2(float32(scale)))``). Remembered per pair of scales outside
    torch.compile: a call computes it with four torch operations on the host."""
    first, last = float(spatial_scales[0]), float(spatial_scales[-1])
    if torch.compiler.is_compiling():
        return _level_range(first, last)
    return _remembered_level_range(first, last)


def _level_range(first_scale: float, last_scale: float) -> tuple[int, int]:
    first = -torch.log2(torch.tensor(first_scale, dtype=torch.float32)).item()
    last = -torch.log2(torch.tensor(last_scale, dtype=torch.float32)).item()
    return int(first), int(last)


_remembered_level_range = functools.lru_cache(maxsize=64)(_level_range)


def box_areas(rois: torch.Tensor) -> torch.Tensor:
    """(K,) areas (x2 - x1) * (y2 - y1) of (K, 5) ROI rows, in their dtype, as torchvision's
    ``box_area`` computes them (a fresh tensor)."""
    sides = rois.detach()[:, 3:5] - rois.detach()[:, 1:3]
    return sides[:, 0] * sides[:, 1]


def levels_of_areas(
    areas: torch.Tensor,
    k_min: int,
    k_max: int,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> torch.Tensor:
    """(K,) int64 level index of each area, torchvision's formula (see `roi_levels`); overwrites
    `areas`."""
    # torchvision's operations in its order, each rounding in the areas' dtype as there, in
    # place: every launch adds to a call's device time.
    areas.sqrt_().div_(canonical_scale).log2_().add_(canonical_level)
    areas.add_(torch.tensor(eps, dtype=areas.dtype)).floor_()
    # NaN stays NaN through clamp; the integral levels minus k_min are exact in any float dtype.
    areas.clamp_(min=k_min, max=k_max).sub_(k_min).nan_to_num_(nan=-1.0)
    return areas.to(torch.int64)


def levels_by_formula(
    rois: torch.Tensor,
    k_min: int,
    k_max: int,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> torch.Tensor:
    """`roi_levels` computed as torchvision computes it, one torch operation after another (12
    launches on CUDA), on any device."""
    return levels_of_areas(box_areas(rois), k_min, k_max, canonical_scale, canonical_level, eps)


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
    [k_min, k_max], in the rois' dtype, exactly as torchvision's ``LevelMapper`` computes it on
    the rois' device. On CUDA each area is compared with the smallest area of every level
    (`area_thresholds`), which gives the same levels in six kernels; elsewhere, under
    torch.compile, or where the formula's levels are not monotonic in the area near a boundary,
    the formula itself runs (`levels_by_formula`). No device synchronisation after the first
    call with a dtype and these constants on a device.
    """
    areas = box_areas(rois)
    # Under torch.compile the formula is traced (its search reads results on the host).
    if areas.is_cuda and k_max > k_min and not torch.compiler.is_compiling():
        constants = (k_min, k_max, canonical_scale, canonical_level, eps)
        bounds = area_thresholds(areas.dtype, areas.device, *constants)
        if bounds is not None:
            return levels_by_thresholds(areas, bounds)
    return levels_of_areas(areas, k_min, k_max, canonical_scale, canonical_level, eps)


def levels_by_thresholds(areas: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """(K,) int64 level index of each area: how many of `bounds` (`area_thresholds`, same dtype
    and device) it reaches; -1 for a negative or NaN area (whose square root is NaN). -0
    compares >= 0 and gets the first level, as log2(-0) = -inf does."""
    return torch.where(areas >= 0, torch.bucketize(areas, bounds, right=True), -1)


# The bit patterns of a dtype's areas from +0 to +inf, in increasing order of their values: the
# integer dtype that views them and the pattern of +inf.
_AREA_PATTERNS = {
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}
_SEARCH_POINTS = 1 << 20  # candidate areas evaluated in one pass
_NEAR = 1 << 16  # every area this many values either side of a boundary is checked


@functools.lru_cache(maxsize=64)
def area_thresholds(
    dtype: torch.dtype,
    device: torch.device,
    k_min: int,
    k_max: int,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> torch.Tensor | None:
    """(k_max - k_min,) tensor of `dtype` on `device`: entry j - 1 is the smallest area >= 0
    whose level index (`levels_of_areas` run on `device`) is at least j; None where those
    levels are not monotonic in the area (then no thresholds give them).

    The search runs the formula itself on `device`: every area of a 16-bit dtype at once; for
    float32 and float64, passes of 2^20 evenly spaced areas narrow each boundary down to
    consecutive values, and then every area within 2^16 values of the boundary is evaluated.
    Levels are checked to never fall across every set of areas evaluated. Far from a boundary
    the formula's value before its floor is far from an integer (each operation is within an
    ulp or two, and one ulp of the area moves that value by under one of its own), so the
    level cannot change between the samples there; near it, the window covers every area.
    """
    int_dtype, top = _AREA_PATTERNS[dtype]
    constants = (k_min, k_max, canonical_scale, canonical_level, eps)

    def levels_at(patterns: torch.Tensor) -> torch.Tensor:
        return levels_of_areas(patterns.to(int_dtype).view(dtype).clone(), *constants)

    def falls(levels: torch.Tensor) -> torch.Tensor:
        return (levels[1:] < levels[:-1]).any().to(torch.int64)

    thresholds = []
    for level in range(1, k_max - k_min + 1):
        low, high = 0, top  # the first pattern at this level is in [low, high]
        while True:
            # The candidates on the device; five numbers a pass come back.
            step = max(1, -(-(high - low + 1) // _SEARCH_POINTS))
            patterns = torch.arange(low, high + step, step, dtype=torch.int64, device=device)
            patterns[-1] = high  # the last sample is the window's end
            levels = levels_at(patterns)
            # The first area at this level; the one before it (the previous pass's sample,
            # when first is 0 in a narrowed window) is below it.
            first = torch.argmax((levels >= level).to(torch.int8))
            before = patterns[(first - 1).clamp(min=0)]
            summary = torch.stack([falls(levels), levels[-1], first, before, patterns[first]])
            fell, last, first, before, at = summary.tolist()
            if fell or last < level:
                return None
            if first == 0 or at - before == 1:
                break
            low, high = before + 1, at
        # Every area within 2^16 values of the boundary: below it, none at this level.
        near = torch.arange(
            max(0, at - _NEAR), min(top, at + _NEAR) + 1, dtype=torch.int64, device=device
        )
        levels = levels_at(near)
        below = ((levels >= level) & (near < at)).any().to(torch.int64)
        if torch.stack([falls(levels), below]).any().item():
            return None
        thresholds.append(at)
    bits = torch.tensor(thresholds, dtype=torch.int64).to(int_dtype)
    return bits.view(dtype).to(device)


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
