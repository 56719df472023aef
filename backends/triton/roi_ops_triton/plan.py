"""Launch planning: which forward kernel runs a call and how large its programs are, and the
backward's block and gradient layout. Pure functions of shapes, strides, device sizes and a
`Tuning`; no Triton, no environment, no device synchronisation.

Sizes that depend on runtime shapes are bounded (block sizes are capped, the rest are runtime
arguments), so shape changes select among a few compiled variants instead of recompiling.
"""

from __future__ import annotations

from .tuning import Tuning


def pow2_ceil(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def forward_kernel(strides: tuple[int, int, int, int], channels: int, tuning: Tuning) -> str:
    """The forward kernel for an (N, C, H, W) input with these strides: ``"unit"`` (unit W
    stride), ``"channels_last"`` (unit C stride and at least ``tuning.channels_last_min_channels``
    channels) or ``"flat"`` (anything else), unless ``tuning.kernel`` names one.

    Raises:
        ValueError: ``tuning.kernel`` is ``"unit"`` and the W stride is not 1.
    """
    _, s_c, _, s_w = strides
    if tuning.kernel != "auto":
        if tuning.kernel == "unit" and s_w != 1:
            raise ValueError(
                f"tuning.kernel: 'unit' needs a unit W stride, got strides {tuple(strides)}; "
                "use 'auto', 'channels_last' or 'flat'"
            )
        return tuning.kernel
    if s_w == 1:
        return "unit"
    if s_c == 1 and channels >= tuning.channels_last_min_channels:
        return "channels_last"
    return "flat"


def unit_target(input_bytes: int, l2_bytes: int, tuning: Tuning) -> int:
    """Outputs per unit program: ``unit_outputs_cached`` when the input fits in L2, else
    ``unit_outputs_streamed``."""
    if input_bytes <= l2_bytes:
        return tuning.unit_outputs_cached
    return tuning.unit_outputs_streamed


def unit_round(bins: int, tuning: Tuning) -> int:
    """Channels one pass of the unit kernel's lanes covers: unit_channels per lane group, with
    ``unit_lanes // min(bins, unit_lanes)`` groups."""
    return tuning.unit_channels * (tuning.unit_lanes // min(bins, tuning.unit_lanes))


def unit_channels_most(channels: int, bins: int, target: int, tuning: Tuning) -> int:
    """Channels per program of the unit kernel when there are ROIs enough: about `target`
    outputs in whole rounds (`unit_round`), never more rounds than the channels need."""
    round_channels = unit_round(bins, tuning)
    per = max(round_channels, target // bins // round_channels * round_channels)
    return min(per, -(-channels // round_channels) * round_channels)


def unit_channels_per_program(
    num_rois: int, channels: int, bins: int, multiprocessors: int, target: int, tuning: Tuning
) -> int:
    """Channels per program of the unit kernel: `unit_channels_most`, halved (in whole rounds)
    until the grid has ``tuning.min_programs_per_sm`` programs per SM or one round is left."""
    round_channels = unit_round(bins, tuning)
    per = unit_channels_most(channels, bins, target, tuning)
    wanted = tuning.min_programs_per_sm * multiprocessors
    while per > round_channels and num_rois * -(-channels // per) < wanted:
        per = max(round_channels, (per // 2) // round_channels * round_channels)
    return per


def channels_last_tile(
    channels: int, bins: int, element_size: int, tuning: Tuning
) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_B) of the channels_last tile: ``channels_last_bytes`` of channels (fewer
    when C is smaller) by up to ``channels_last_bins`` bins."""
    block_c = min(pow2_ceil(channels), max(1, tuning.channels_last_bytes // element_size))
    return block_c, min(pow2_ceil(bins), tuning.channels_last_bins)


def flat_lanes(channels: int, bins: int, tuning: Tuning) -> int:
    """Outputs per flat program: the ROI's C * PH * PW rounded up to a power of two, at most
    ``flat_lanes`` and at least 16."""
    return max(16, min(tuning.flat_lanes, pow2_ceil(channels * bins)))


def backward_block(grad_input_bytes: int, l2_bytes: int, tuning: Tuning) -> int:
    """grad_output elements per backward program for an accumulation buffer of this size."""
    if grad_input_bytes <= l2_bytes:
        return tuning.backward_outputs
    return tuning.backward_outputs_streamed


def channels_last_gradient(input_elements: int, grad_output_elements: int, tuning: Tuning) -> bool:
    """Whether the backward writes a channels_last input's gradient channels_last (else
    contiguous, which roi_ops copies): as ``tuning.gradient_layout`` says, and under ``"auto"``
    when the input has at least as many elements as grad_output."""
    if tuning.gradient_layout != "auto":
        return tuning.gradient_layout == "channels_last"
    return input_elements >= grad_output_elements


MAX_LEVELS = 5  # argument sets of the fused multi-level kernels (FPN P2-P6)


def multi_scale_kernel(
    strides: list[tuple[int, int, int, int]], channels: int, pixels: list[int], tuning: Tuning
) -> tuple[str | None, list[str]]:
    """The fused multi-level forward kernel for levels of these strides and H * W sizes:
    (``"unit"`` or ``"channels_last"``, []) when every level takes that kernel
    (`forward_kernel`), else (None, the reasons roi_ops pools level by level instead)."""
    reasons = []
    if len(strides) > MAX_LEVELS:
        reasons.append(
            f"{len(strides)} pyramid levels: the fused kernels take at most {MAX_LEVELS}"
        )
    empty = [level for level, count in enumerate(pixels) if count == 0]
    if empty or channels == 0:
        reasons.append(f"levels {empty} have no pixel" if empty else "no channel")
    kernels = []
    for level, level_strides in enumerate(strides):
        try:
            kernels.append(forward_kernel(level_strides, channels, tuning))
        except ValueError:
            kernels.append(f"none (level {level} has no unit W stride)")
    names = sorted(set(kernels))
    if names not in (["unit"], ["channels_last"]):
        by_kernel = {name: [i for i, k in enumerate(kernels) if k == name] for name in names}
        described = ", ".join(f"{name} for levels {levels}" for name, levels in by_kernel.items())
        reasons.append(
            f"no fused kernel for these levels' layouts ({described}): every level needs a unit "
            "W stride (NCHW), or every level a unit C stride and at least "
            f"{tuning.channels_last_min_channels} channels (channels_last)"
        )
    if reasons:
        return None, reasons
    return names[0], []
