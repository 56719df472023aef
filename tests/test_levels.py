"""Levels by area thresholds against torchvision's formula run by torch (levels_by_formula): every
area of the 16-bit dtypes, and every area near each boundary of float32 and float64; roi_levels
on CUDA, the thresholds found on the CPU by the CPU's formula."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_AND_CUDA

import roi_ops.levels as levels_module
from roi_ops.levels import (
    area_thresholds,
    box_areas,
    level_range,
    levels_by_formula,
    levels_by_thresholds,
    roi_levels,
)

INTEGERS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
# (k_min, k_max, canonical_scale, canonical_level, eps): torchvision's, more levels, others.
CONSTANTS = [(2, 5, 224, 4, 1e-6), (0, 7, 224, 4, 1e-6), (1, 4, 256, 3, 1e-3), (2, 3, 100, 5, 0.0)]


def _rois_of_areas(areas: torch.Tensor) -> torch.Tensor:
    """Rows (0, 0, 0, 1, a): each box's area is a, exactly, in a's dtype."""
    zeros, ones = torch.zeros_like(areas), torch.ones_like(areas)
    return torch.stack([zeros, zeros, zeros, ones, areas], dim=1)


def _specials(dtype) -> torch.Tensor:
    values = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), -1.0, -1e-30, 1e-30]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def _assert_levels_match(areas: torch.Tensor, constants) -> None:
    """The thresholds' levels (roi_levels' on CUDA; on the CPU, where roi_levels runs the
    formula, the thresholds found with the CPU's formula) equal the formula's."""
    rois = _rois_of_areas(areas)
    expected = levels_by_formula(rois, *constants)
    if areas.is_cuda:
        got = roi_levels(rois, *constants)
    else:
        bounds = area_thresholds(areas.dtype, areas.device, *constants)
        got = levels_by_thresholds(box_areas(rois), bounds)
    mismatch = (got != expected).nonzero().squeeze(1)
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} areas, first {areas[mismatch[:4]].tolist()}: "
        f"got {got[mismatch[:4]].tolist()}, expected {expected[mismatch[:4]].tolist()}"
    )


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("constants", CONSTANTS, ids=str)
def test_every_16_bit_area_gets_the_formulas_level(device, dtype, constants):
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    areas = patterns.to(device).view(dtype)  # every value: both signs, infinities, NaNs
    assert area_thresholds(dtype, areas.device, *constants) is not None
    _assert_levels_match(areas, constants)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("constants", CONSTANTS, ids=str)
def test_areas_near_every_boundary_get_the_formulas_level(device, dtype, constants):
    bounds = area_thresholds(dtype, torch.device(device), *constants)
    assert bounds is not None and bounds.numel() == constants[1] - constants[0]
    integer = INTEGERS[dtype]
    near = torch.arange(-(2**16), 2**16, dtype=torch.int64)
    patterns = [bound.view(integer).to(torch.int64).cpu() + near for bound in bounds.view(-1, 1)]
    # and a million areas spread over every positive value, then their negatives
    top = torch.tensor(float("inf"), dtype=dtype).view(integer).item()
    spread = torch.linspace(0, top, 2**20, dtype=torch.float64).to(torch.int64).clamp_(max=top)
    patterns = torch.cat([*patterns, spread]).clamp_(min=0).to(integer)
    areas = patterns.to(device).view(dtype)
    _assert_levels_match(torch.cat([areas, -areas, _specials(dtype).to(device)]), constants)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_levels_without_thresholds_come_from_the_formula(device, monkeypatch):
    # Levels that fall again after a boundary: no thresholds give them, so roi_levels runs
    # the formula (here a stand-in that is not monotonic in the area).
    def wavy(areas, k_min, k_max, *rest):
        return (areas.nan_to_num(nan=-1.0).clamp(min=-1, max=40).floor() % 2).to(torch.int64)

    area_thresholds.cache_clear()
    monkeypatch.setattr(levels_module, "levels_of_areas", wavy)
    try:
        assert area_thresholds(torch.float16, torch.device(device), 2, 5) is None
        rois = _rois_of_areas(
            torch.tensor([0.5, 1.5, 2.5, 3.0], dtype=torch.float16, device=device)
        )
        assert roi_levels(rois, 2, 5).tolist() == [0, 1, 0, 1]
    finally:
        area_thresholds.cache_clear()


def test_a_level_that_falls_near_a_boundary_gives_no_thresholds(monkeypatch):
    # One area 3,000 values above the boundary at 100 falls back a level: the evenly spaced
    # passes step over it, the check of every area near the boundary does not.
    boundary = torch.tensor(100.0).view(torch.int32)
    dip = (boundary + 3000).view(torch.float32)

    def dipped(areas, k_min, k_max, *rest):
        return ((areas >= 100.0) & (areas != dip)).to(torch.int64)

    area_thresholds.cache_clear()
    monkeypatch.setattr(levels_module, "levels_of_areas", dipped)
    try:
        assert area_thresholds(torch.float32, torch.device("cpu"), 2, 3) is None
        monkeypatch.setattr(levels_module, "levels_of_areas", lambda a, *_: (a >= 100.0).long())
        area_thresholds.cache_clear()
        assert area_thresholds(torch.float32, torch.device("cpu"), 2, 3).tolist() == [100.0]
    finally:
        area_thresholds.cache_clear()


def test_the_cpu_runs_the_formula():
    # On the CPU torch's vectorised and scalar loops may round log2 differently by position,
    # so the levels come from the formula on the same tensor, as torchvision's do.
    rois = _rois_of_areas(torch.tensor([0.0, 50.0**2, 224.0**2, 1e6, -4.0, float("nan")]))
    expected = levels_by_formula(rois, 2, 5)
    assert roi_levels(rois, 2, 5).tolist() == expected.tolist() == [0, 0, 2, 3, -1, -1]


def _torchvision_level(scale: float) -> int:
    """The level of `scale` as MultiScaleRoIAlign's set-up computes it."""
    return int(-torch.log2(torch.tensor(scale, dtype=torch.float32)).item())


def test_level_range_matches_torchvision_on_repeated_calls():
    # Scales at and one float64 or float32 step either side of powers of two: float32 rounding
    # decides the level, as in torchvision.
    powers = [2.0**-k for k in range(0, 8)]
    near = [s * (1 + d) for s in powers for d in (2.0**-52, -(2.0**-52), 2.0**-23, -(2.0**-23))]
    scales = powers + near + [0.3, 1 / 3, 0.0625, 1e-3]
    for first in scales:
        for last in (first / 8, first / 2, first):
            expected = (_torchvision_level(first), _torchvision_level(last))
            for _ in range(2):  # the second call is answered from memory
                assert level_range([first, last]) == expected, (first, last)
                assert level_range((first, 0.5, last)) == expected, (first, last)
