"""Launch planning and tuning (`roi_ops_triton.plan`, `roi_ops_triton.tuning`): pure functions of
shapes, strides and device sizes, so these run without Triton."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from roi_ops_triton import plan
from roi_ops_triton.tuning import DEFAULT_TUNING, Tuning


def test_the_kernel_follows_the_strides():
    """The unit kernel for a unit W stride, the channels_last tile for a unit C stride (with
    enough channels), the flat tile otherwise, whatever the width; a named kernel when asked."""
    for width in (1, 7, 30, 63, 100, 272, 5000):
        x = torch.empty(2, 256, 50, width)
        assert plan.forward_kernel(x.stride(), 256, DEFAULT_TUNING) == "unit"
        last = x.contiguous(memory_format=torch.channels_last)
        assert plan.forward_kernel(last.stride(), 256, DEFAULT_TUNING) == "channels_last"
        strided = torch.empty(2, 256, 50, 2 * width)[..., ::2]
        assert plan.forward_kernel(strided.stride(), 256, DEFAULT_TUNING) == "flat"
    few = torch.empty(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    assert plan.forward_kernel(few.stride(), 4, DEFAULT_TUNING) == "flat"
    for name in ("flat", "channels_last"):
        forced = Tuning(kernel=name)
        assert plan.forward_kernel(few.stride(), 4, forced) == name


def test_the_unit_kernel_needs_a_unit_w_stride():
    strided = torch.empty(1, 3, 4, 10)[..., ::2]
    with pytest.raises(ValueError, match="tuning.kernel: 'unit' needs a unit W stride"):
        plan.forward_kernel(strided.stride(), 3, Tuning(kernel="unit"))


def test_tile_sizes_are_bounded():
    """Shape changes pick among a few compiled variants: block sizes are capped."""
    assert plan.channels_last_tile(256, 49, 4, DEFAULT_TUNING) == (32, 64)
    assert plan.channels_last_tile(256, 49, 2, DEFAULT_TUNING) == (64, 64)
    assert plan.channels_last_tile(256, 196, 8, DEFAULT_TUNING) == (16, 64)
    assert plan.channels_last_tile(12, 9, 4, DEFAULT_TUNING) == (16, 16)
    assert plan.flat_lanes(256, 49, DEFAULT_TUNING) == 512
    assert plan.flat_lanes(1, 2, DEFAULT_TUNING) == 16
    assert plan.flat_lanes(3, 7, Tuning(flat_lanes=16)) == 16


def test_unit_channels_per_program():
    """Whole rounds of channels per lane group, about the target outputs, enough programs."""
    tuning = DEFAULT_TUNING
    # 49 bins in 256 lanes: 5 groups, rounds of 20 channels; 8192 // 49 = 167 -> 160.
    assert plan.unit_channels_per_program(512, 1024, 49, 132, 8192, tuning) == 160
    # Few ROIs: halved (in whole rounds) until 8 programs per SM, or one round.
    assert plan.unit_channels_per_program(4, 1024, 49, 132, 8192, tuning) == 20
    assert plan.unit_channels_per_program(64, 256, 49, 132, 8192, tuning) == 20
    # 196 bins: one group, rounds of 4 channels; never more channels than the input has
    # (rounded up to a round).
    assert plan.unit_channels_per_program(1000, 256, 196, 132, 1024, tuning) == 4
    assert plan.unit_channels_per_program(1000, 3, 196, 132, 8192, tuning) == 4
    # More bins than lanes: one group.
    assert plan.unit_channels_per_program(1000, 64, 1024, 1, 8192, tuning) == 8
    # Two channels per lane: rounds of 10 for 49 bins.
    two = Tuning(unit_channels=2)
    assert plan.unit_round(49, two) == 10
    assert plan.unit_channels_per_program(512, 1024, 49, 132, 8192, two) == 160


def test_the_unit_target_follows_the_l2_fit():
    assert plan.unit_target(10 * 2**20, 50 * 2**20, DEFAULT_TUNING) == 8192
    assert plan.unit_target(60 * 2**20, 50 * 2**20, DEFAULT_TUNING) == 1024
    assert plan.unit_target(1, 0, DEFAULT_TUNING) == 1024  # L2 unknown (the interpreter)


def test_backward_block_follows_the_l2_fit():
    tuning = DEFAULT_TUNING
    assert plan.backward_block(10 * 2**20, 50 * 2**20, tuning) == tuning.backward_outputs
    assert plan.backward_block(60 * 2**20, 50 * 2**20, tuning) == 512
    assert plan.backward_block(1, 0, tuning) == tuning.backward_outputs_streamed


def test_channels_last_gradient_when_the_input_outnumbers_grad_output():
    assert plan.channels_last_gradient(111_411_200, 51_380_224, DEFAULT_TUNING)  # fpn-p2
    assert not plan.channels_last_gradient(6_963_200, 205_520_896, DEFAULT_TUNING)  # mask-14
    assert plan.channels_last_gradient(1, 2, Tuning(gradient_layout="channels_last"))
    assert not plan.channels_last_gradient(2, 1, Tuning(gradient_layout="contiguous"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kernel": "fast"}, "kernel: expected one of"),
        ({"gradient_layout": "nhwc"}, "gradient_layout: expected one of"),
        ({"unit_lanes": 96}, "unit_lanes: expected a power of two, got 96"),
        ({"unit_channels": 3}, "unit_channels: expected a power of two, got 3"),
        ({"unit_channels": 8}, r"unit_channels: expected one of \(1, 2, 4\), got 8"),
        ({"unit_outputs_cached": 0}, "unit_outputs_cached: expected at least 1, got 0"),
    ],
)
def test_tuning_values_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DEFAULT_TUNING, **change)


def test_tuning_is_a_frozen_value():
    assert Tuning() == DEFAULT_TUNING and hash(Tuning()) == hash(DEFAULT_TUNING)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_TUNING.unit_lanes = 64  # type: ignore[misc]
