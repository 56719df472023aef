"""Differential test of the numba forward: random problems against the scalar reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numba_cases import DTYPES, LAYOUTS, check, make_backend, random_features, run_forward
from numba_cases import layout as to_layout
from roi_ops.bad_rois import new_log, record_bad_rois

pytest.importorskip("numba")

_SPECIAL_COORDS = [-1e30, -7.5, -2.5, -0.5, 0.0, 0.5, 1.5, 2.5, 3.0, 7.5, 11.5, 1e30]


@st.composite
def _cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rois_dtype = dtype
    if dtype in (torch.float16, torch.bfloat16) and draw(st.booleans()):
        rois_dtype = torch.float32
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    ph, pw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1 / 16, 0.25, 0.5, 1.0, 2.0]))
    coord = st.one_of(
        st.sampled_from(_SPECIAL_COORDS),
        st.floats(-4 / scale, (max(h, w) + 4) / scale, allow_nan=False),
        st.integers(-2, 2 * max(h, w)).map(lambda v: v / 2 / scale),  # exact .5 products
    )
    batch = st.one_of(st.integers(0, n - 1).map(float), st.sampled_from([-1.0, n, 0.9, math.nan]))
    rows = draw(st.lists(st.tuples(batch, coord, coord, coord, coord), min_size=0, max_size=6))
    seed = draw(st.integers(0, 2**16))
    ties = draw(st.booleans())
    specials = draw(st.lists(st.sampled_from([math.nan, -math.inf, math.inf, -0.0]), max_size=3))
    layout = draw(st.sampled_from(LAYOUTS))
    return dtype, rois_dtype, (n, c, h, w), (ph, pw), scale, rows, seed, ties, specials, layout


@settings(max_examples=40, deadline=None)
@given(
    case=_cases(),
    stage_bytes=st.sampled_from([0, 100, 512 * 1024]),
    coverage=st.sampled_from([0.0, 0.5, math.inf]),
    min_block=st.sampled_from([1, 64]),
    task_bytes=st.sampled_from([0, 16 * 2**20]),
    schedule=st.sampled_from(["serial", "parallel"]),
    stream=st.sampled_from([0, 2**62]),
)
def test_differential(case, stage_bytes, coverage, min_block, task_bytes, schedule, stream):
    """Random small problems (bad rows and special values included) under every tuning knob
    that picks a path, serial and parallel: bits, argmax and the bad-ROI log."""
    backend = make_backend(
        schedule,
        stage_bytes=stage_bytes,
        stage_min_coverage=coverage,
        stage_min_block=min_block,
        stage_task_bytes=task_bytes,
        stream_min_bytes=stream,
    )
    dtype, rois_dtype, shape, size, scale, rows, seed, ties, specials, layout = case
    g = torch.Generator().manual_seed(seed)
    x = random_features(shape, dtype, g, ties)
    flat = x.view(-1)
    for value in specials:
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = value
    rois = torch.tensor(rows, dtype=torch.float64).view(-1, 5).to(rois_dtype)
    check(backend, to_layout(x, layout), rois, size, scale)
    log, expected = new_log(), new_log()
    run_forward(backend, to_layout(x, layout), rois, size, scale, log=log)
    record_bad_rois(expected, rois, shape[0])
    assert torch.equal(log, expected)
