"""Vectorised, exact ROI geometry (docs/contract.md, "Geometry of one ROI") in torch ops.

Used by the torch backend; any backend may use it too. Every float operation runs on tensors of
the geometry dtype G, so torch rounds each one to G exactly as the contract asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .backend import RoIPoolProblem

INDEX_LIMIT = 2**40


@dataclass(frozen=True)
class RoiBins:
    """Bin edges of K ROIs. Invalid ROIs have every bin empty (start == end == 0).

    Attributes:
        batch_index: (K,) int64, clamped into [0, N) (meaningless where ``valid`` is False).
        valid: (K,) bool.
        hstart, hend: (K, PH) int64 row edges, in [0, H].
        wstart, wend: (K, PW) int64 column edges, in [0, W].
    """

    batch_index: torch.Tensor
    valid: torch.Tensor
    hstart: torch.Tensor
    hend: torch.Tensor
    wstart: torch.Tensor
    wend: torch.Tensor


def geometry_dtype(rois_dtype: torch.dtype) -> torch.dtype:
    """The geometry dtype G: the rois' dtype, except float32 for bfloat16 rois."""
    return torch.float32 if rois_dtype == torch.bfloat16 else rois_dtype


def geometry_scale(spatial_scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """G(spatial_scale) as a 0-d tensor: exact for float64, through float32 otherwise."""
    if dtype == torch.float64:
        return torch.tensor(spatial_scale, dtype=torch.float64, device=device)
    return torch.tensor(spatial_scale, dtype=torch.float32, device=device).to(dtype)


def c_round(values: torch.Tensor) -> torch.Tensor:
    """C `round` (halves away from zero), exact in the tensor's dtype; NaN/inf pass through."""
    whole = torch.trunc(values)
    fraction = values - whole  # exact: the fractional part is representable
    step = torch.where(fraction.abs() >= 0.5, torch.sign(values), torch.zeros_like(values))
    return whole + step


def to_index(values: torch.Tensor) -> torch.Tensor:
    """The contract's `index(v)`: NaN -> 0, saturate to [-2^40, 2^40], as int64."""
    wide = torch.nan_to_num(
        values.to(torch.float64), nan=0.0, posinf=INDEX_LIMIT, neginf=-INDEX_LIMIT
    )
    return wide.clamp(-INDEX_LIMIT, INDEX_LIMIT).to(torch.int64)


def _axis_edges(
    corner: torch.Tensor, roi_size: torch.Tensor, bins: int, limit: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(bins + 1, device=corner.device)
    bin_size = roi_size.to(dtype) / positions[bins].to(dtype)
    scaled = positions.to(dtype)[None, :] * bin_size[:, None]
    starts = to_index(torch.floor(scaled[:, :-1])) + corner[:, None]
    ends = to_index(torch.ceil(scaled[:, 1:])) + corner[:, None]
    return starts.clamp(0, limit), ends.clamp(0, limit)


def roi_bins(
    rois: torch.Tensor,
    num_images: int,
    height: int,
    width: int,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
) -> RoiBins:
    """Bin edges of every ROI, exactly per the contract.

    Args:
        rois: (K, 5) floating tensor (batch_index, x1, y1, x2, y2).
        num_images: N of the input.
        height: H of the input.
        width: W of the input.
        pooled_height: PH.
        pooled_width: PW.
        spatial_scale: the coordinate scale.

    Returns:
        RoiBins with (K,), (K, PH) and (K, PW) tensors on the rois' device.
    """
    dtype = geometry_dtype(rois.dtype)
    values = rois.to(dtype)
    batch = torch.trunc(values[:, 0])
    valid = torch.isfinite(values).all(dim=1) & (batch >= 0) & (batch < num_images)
    batch_index = torch.where(valid, batch, torch.zeros_like(batch)).to(torch.int64)
    corners = to_index(c_round(values[:, 1:] * geometry_scale(spatial_scale, dtype, rois.device)))
    x1, y1, x2, y2 = corners.unbind(dim=1)
    roi_width = (x2 - x1 + 1).clamp(min=1)
    roi_height = (y2 - y1 + 1).clamp(min=1)
    hstart, hend = _axis_edges(y1, roi_height, pooled_height, height, dtype)
    wstart, wend = _axis_edges(x1, roi_width, pooled_width, width, dtype)
    keep = valid[:, None]
    return RoiBins(
        batch_index=batch_index.clamp(0, max(num_images - 1, 0)),
        valid=valid,
        hstart=torch.where(keep, hstart, 0),
        hend=torch.where(keep, hend, 0),
        wstart=torch.where(keep, wstart, 0),
        wend=torch.where(keep, wend, 0),
    )


def problem_bins(problem: RoIPoolProblem) -> RoiBins:
    """`roi_bins` of every ROI of `problem`, on its input's sizes and its output size and scale."""
    num_images, _, height, width = problem.input.shape
    return roi_bins(
        problem.rois,
        num_images,
        height,
        width,
        problem.pooled_height,
        problem.pooled_width,
        problem.spatial_scale,
    )
