"""Hypothesis strategies that draw contract-relevant roi_pool calls (needs `hypothesis`)."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from .cases import RoiPoolCase, rois_dtype_for

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCALES = (1.0, 0.5, 0.25, 1 / 16, 1 / 8, 0.3, 2.0)


@st.composite
def feature_maps(draw, dtype: torch.dtype, max_side: int = 12, allow_empty: bool = False):
    """A (N, C, H, W) tensor (CPU) with ties, NaN and +-inf sprinkled in; never all zeros."""
    low = 0 if allow_empty else 1
    shape = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
        draw(st.integers(low, max_side)),
        draw(st.integers(low, max_side)),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * 4 + 1
    if draw(st.booleans()):  # ties
        values = values.round()
    special = draw(st.sampled_from(["none", "nan", "neg-inf", "pos-inf", "mixed"]))
    if special != "none" and values.numel():
        mask = torch.rand(shape, generator=g) < 0.08
        fill = {"nan": math.nan, "neg-inf": -math.inf, "pos-inf": math.inf}
        if special == "mixed":
            values[mask] = math.nan
            values[torch.rand(shape, generator=g) < 0.1] = -math.inf
        else:
            values[mask] = fill[special]
    if values.numel() and bool((values == 0).all()):
        values += 1
    return values.to(dtype)


@st.composite
def coordinates(draw, extent: float):
    """One image-pixel coordinate: integers, exact halves, off-map, or arbitrary floats."""
    kind = draw(st.sampled_from(["int", "half", "float", "far"]))
    if kind == "int":
        return float(draw(st.integers(-4, int(extent) + 4)))
    if kind == "half":
        return draw(st.integers(-8, 2 * int(extent) + 8)) / 2 + (
            0.0 if draw(st.booleans()) else 0.25
        )
    if kind == "far":
        return draw(st.sampled_from([-1e4, -50.0, 3 * extent + 7, 1e4]))
    return draw(st.floats(-0.25 * extent - 2, 1.25 * extent + 2, allow_nan=False))


@st.composite
def roi_pool_cases(
    draw,
    dtypes=DTYPES,
    allow_invalid: bool = True,
    allow_lists: bool = True,
    max_side: int = 12,
    max_rois: int = 8,
):
    """A `RoiPoolCase` on the CPU (move it with `case_to_device`).

    Draws shapes, dtypes (rois in the input's dtype or float32 for half inputs), both rois formats,
    exact-half coordinates, off-map and inverted boxes, float-edge heights (57 rows with PH 7),
    ties, NaN/inf features, K = 0, and, when `allow_invalid`, rows with out-of-range batch indices
    or non-finite coordinates (such cases set ``needs_unchecked``).
    """
    dtype = draw(st.sampled_from(dtypes))
    rois_dtype = rois_dtype_for(dtype)
    if dtype in (torch.float16, torch.bfloat16) and draw(st.booleans()):
        rois_dtype = torch.float32
    float_edge = draw(st.integers(0, 9)) == 0
    x = draw(feature_maps(dtype, max_side=max_side))
    num_images, _, height, width = x.shape
    if float_edge:
        x = torch.cat([x] * math.ceil(64 / max(height, 1)), dim=2)[:, :, :64]
        height = x.shape[2]
    scale = 1.0 if float_edge else draw(st.sampled_from(SCALES))
    pooled = (
        (7, draw(st.integers(1, 3)))
        if float_edge
        else (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    )
    count = draw(st.integers(0, max_rois))
    rows, invalid = [], False
    for _ in range(count):
        batch = float(draw(st.integers(0, num_images - 1)))
        if draw(st.integers(0, 3)) == 0:
            batch += draw(st.sampled_from([0.25, 0.75]))  # fractional indices truncate
        box = [
            draw(coordinates(width / scale)),
            draw(coordinates(height / scale)),
            draw(coordinates(width / scale)),
            draw(coordinates(height / scale)),
        ]
        if float_edge:
            top = float(draw(st.integers(0, 6)))
            box[1], box[3] = top, top + 56.0
        if allow_invalid and draw(st.integers(0, 9)) == 0:
            invalid = True
            slot = draw(st.integers(0, 4))
            bad = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, float(num_images)]))
            if slot == 0:
                batch = bad
            else:
                box[slot - 1] = bad if not math.isfinite(bad) else box[slot - 1]
        rows.append([batch, *box])
    rois = torch.tensor(rows, dtype=torch.float64).reshape(-1, 5).to(rois_dtype)
    if not invalid and allow_lists and draw(st.booleans()):
        per_image = [rois[rois[:, 0].trunc() == i, 1:] for i in range(num_images)]
        keep = draw(st.integers(0, num_images))
        dropped = sum(len(p) for p in per_image[keep:])
        if dropped == 0:
            return RoiPoolCase("hypothesis-list", x, per_image[:keep], pooled, scale)
    return RoiPoolCase("hypothesis", x, rois, pooled, scale, needs_unchecked=invalid)


def case_to_device(case: RoiPoolCase, device: torch.device | str) -> RoiPoolCase:
    """A copy of `case` with its tensors on `device`."""
    rois = case.rois
    rois = rois.to(device) if isinstance(rois, torch.Tensor) else [r.to(device) for r in rois]
    return RoiPoolCase(
        case.name,
        case.input.to(device),
        rois,
        case.output_size,
        case.spatial_scale,
        case.needs_unchecked,
        case.tags,
    )


@st.composite
def multi_scale_cases(draw, dtypes=DTYPES, max_levels: int = 4):
    """A `MultiScaleCase` on the CPU: 2 to `max_levels` consecutive levels (a feature pyramid
    whose finest level has stride 1, 2 or 4), ties/NaN/inf features, boxes from one cell to
    larger than the image, exact-half coordinates and boxes inverted along one axis."""
    from .multi_scale import MultiScaleCase

    dtype = draw(st.sampled_from(dtypes))
    rois_dtype = rois_dtype_for(dtype)
    if dtype in (torch.float16, torch.bfloat16) and draw(st.booleans()):
        rois_dtype = torch.float32
    levels = draw(st.integers(2, max_levels))
    first_level = draw(st.integers(0, 2))
    num_images, channels = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    height = draw(st.integers(2**levels, 24))
    width = draw(st.integers(2**levels, 24))
    special = draw(st.sampled_from([None, math.nan, -math.inf]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    features = []
    for level in range(levels):
        shape = (num_images, channels, -(-height // 2**level), -(-width // 2**level))
        values = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).round()  # ties
        if special is not None:
            values[torch.rand(shape, generator=g) < 0.05] = special
        features.append(values.to(dtype))
    stride = 2**first_level
    image_w, image_h = width * stride, height * stride
    rows = []
    for _ in range(draw(st.integers(0, 10))):
        batch = float(draw(st.integers(0, num_images - 1)))
        size = draw(st.sampled_from([1.0, 3.5, 16.0, 57.0, 112.0, 224.0, 450.0, 1000.0]))
        x1 = draw(coordinates(image_w))
        y1 = draw(coordinates(image_h))
        x2 = x1 + size * draw(st.sampled_from([1.0, 0.5, 2.0, -0.5]))  # negative: inverted
        y2 = y1 + size
        rows.append([batch, x1, y1, x2, y2])
    rois = torch.tensor(rows, dtype=torch.float64).reshape(-1, 5).to(rois_dtype)
    scales = [1 / 2 ** (first_level + level) for level in range(levels)]
    output_size = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return MultiScaleCase("hypothesis-pyramid", features, rois, output_size, scales)
