"""Multi-level (FPN) cases and their exact check against the scalar reference, level by level.

`check_multi_scale_case` compares `roi_ops.multi_scale_roi_pool` on a backend with
`reference_roi_pool` of each ROI on its level (the level computed by torchvision's formula,
`roi_ops.levels.levels_by_formula`, on the rois' device, as the contract says): output bits,
inference output, and every level's gradient from small-integer grad_outputs (exact sums).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import poisoned_outputs, value_checks
from ..levels import level_range, levels_by_formula
from ..multi_scale import multi_scale_roi_pool
from .cases import INPUT_AXES, _assert_same_values
from .reference import reference_roi_pool, reference_roi_pool_backward

COMPARISONS: Counter[str] = Counter()


@dataclass
class MultiScaleCase:
    """One multi-level call to check.

    Attributes:
        name: what the case exercises.
        features: L (N, C, H_l, W_l) tensors, finest first.
        rois: (K, 5) rows.
        output_size: int or (PH, PW).
        spatial_scales: L scales of consecutive pyramid levels.
    """

    name: str
    features: list[torch.Tensor]
    rois: torch.Tensor
    output_size: int | tuple[int, int]
    spatial_scales: list[float]

    def to(self, device: torch.device | str) -> MultiScaleCase:
        """A copy with its tensors on `device`."""
        return MultiScaleCase(
            self.name,
            [f.to(device) for f in self.features],
            self.rois.to(device),
            self.output_size,
            list(self.spatial_scales),
        )

    def __repr__(self) -> str:
        shapes = [tuple(f.shape) for f in self.features]
        dtype = str(self.features[0].dtype).removeprefix("torch.")
        return (
            f"MultiScaleCase({self.name!r}, levels={shapes} {dtype}, K={self.rois.shape[0]}, "
            f"output_size={self.output_size}, scales={self.spatial_scales})"
        )


def _pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    return (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)


def reference_by_level(
    features: Sequence[torch.Tensor],
    rois: torch.Tensor,
    levels: torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scales: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, argmax) on the CPU: row k is `reference_roi_pool` of ROI k on
    ``features[levels[k]]`` with ``spatial_scales[levels[k]]``; zeros and argmax -1 for a row
    whose level is outside [0, L) (no level).

    The levels are given, not computed, so a test may assign any level to any row.
    """
    levels, rois = levels.cpu(), rois.cpu()
    ph, pw = _pair(output_size)
    first = features[0]
    output = torch.zeros(rois.shape[0], first.shape[1], ph, pw, dtype=first.dtype)
    argmax = torch.full(output.shape, -1, dtype=torch.int32)
    for level, feature in enumerate(features):
        rows = (levels == level).nonzero().squeeze(1)
        if len(rows):
            out, arg = reference_roi_pool(
                feature.detach().cpu(), rois[rows], (ph, pw), spatial_scales[level]
            )
            output[rows], argmax[rows] = out, arg
    return output, argmax


def reference_multi_scale(case: MultiScaleCase):
    """(output, argmax, levels) on the CPU: `reference_roi_pool` of every ROI on its level."""
    levels = levels_by_formula(case.rois, *level_range(case.spatial_scales)).cpu()
    output, argmax = reference_by_level(
        case.features, case.rois, levels, case.output_size, case.spatial_scales
    )
    return output, argmax, levels


def check_multi_scale_case(case: MultiScaleCase, backend: str) -> None:
    """Assert `backend` matches the level-by-level reference on `case` (output bits, inference
    output, and each level's gradient); outputs are poisoned before the backend runs."""
    COMPARISONS[backend] += 1
    expected, argmax, levels = reference_multi_scale(case)
    args = (case.rois, case.output_size, case.spatial_scales)
    with poisoned_outputs(), value_checks(True):
        with torch.no_grad():
            inference = multi_scale_roi_pool(case.features, *args, backend=backend)
        _assert_same_values(inference, expected, f"{backend}: {case!r} inference output")
        leaves = [f.detach().clone().requires_grad_(True) for f in case.features]
        pooled = multi_scale_roi_pool(leaves, *args, backend=backend)
        _assert_same_values(pooled.detach(), expected, f"{backend}: {case!r} training output")
    g = torch.Generator().manual_seed(2)
    grad_output = torch.randint(1, 5, pooled.shape, generator=g).to(pooled.dtype)
    pooled.backward(grad_output.to(pooled.device))
    rois = case.rois.cpu()
    for level, leaf in enumerate(leaves):
        mine = (levels == level)[:, None, None, None]
        expected_grad = reference_roi_pool_backward(
            grad_output * mine, torch.where(mine, argmax, -1), rois, tuple(leaf.shape)
        ).to(leaf.dtype)
        got = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        _assert_same_values(
            got.cpu(),
            expected_grad,
            f"{backend}: {case!r} gradient of level {level}",
            axes=INPUT_AXES,
            bitwise=False,
        )


def pyramid_case(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    levels: int = 4,
    seed: int = 0,
    channels_last: bool = False,
) -> MultiScaleCase:
    """A small P2.. pyramid of a 2-image batch with boxes on every level, some inverted along
    one axis (no level: zeros), some off the image."""
    g = torch.Generator().manual_seed(seed)
    height, width = 96, 128  # at stride 4: a 384 x 512 image
    features = []
    for level in range(levels):
        shape = (2, 3, -(-height // 2**level), -(-width // 2**level))
        values = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).round().to(dtype)
        if channels_last:
            values = values.contiguous(memory_format=torch.channels_last)
        features.append(values.to(device))
    count = 48
    side = torch.exp(torch.rand(count, 1, generator=g, dtype=torch.float64) * 6.6) + 1
    aspect = torch.exp(torch.rand(count, 1, generator=g, dtype=torch.float64) - 0.5)
    corner = torch.rand(count, 2, generator=g, dtype=torch.float64) * torch.tensor([512.0, 384])
    boxes = torch.cat([corner, corner + torch.cat([side * aspect, side / aspect], 1)], 1)
    boxes[::11, 2] = boxes[::11, 0] - 4  # inverted along x: no level
    batch = torch.arange(count, dtype=torch.float64)[:, None] % 2
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    rois = torch.cat([batch, boxes], 1).to(rois_dtype).to(device)
    scales = [1 / 2 ** (2 + level) for level in range(levels)]
    return MultiScaleCase(f"pyramid-{levels}", features, rois, 7, scales)
