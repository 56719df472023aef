"""The Triton backend's tuning: one frozen value that planning and launch read.

`DEFAULT_TUNING` is what the backend runs with. Probes and tests compare variants by passing
another value, e.g. ``dataclasses.replace(DEFAULT_TUNING, unit_lanes=64, unit_warps=2)``, to
``TritonBackend(tuning=...)`` or to `roi_ops_triton.launch`; nothing here reads the environment.
The measurements behind the defaults are in docs/benchmarks.md and the package README.
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARD_KERNELS = ("auto", "unit", "channels_last", "flat")
GRADIENT_LAYOUTS = ("auto", "channels_last", "contiguous")
UNIT_CHANNELS = (1, 2, 4)  # the unit kernel's channels per lane (written out in the kernel)
_POWERS_OF_TWO = (
    "unit_lanes unit_warps unit_channels channels_last_bins channels_last_bytes "
    "channels_last_warps flat_lanes flat_warps backward_outputs backward_outputs_streamed "
    "backward_warps"
).split()


def _power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


@dataclass(frozen=True)
class Tuning:
    """Launch sizes of the Triton kernels. Lanes, warps and bins are powers of two.

    Attributes:
        kernel: the forward kernel: ``"auto"`` chooses from the input's strides (``unit`` for a
            unit W stride, ``channels_last`` for a unit C stride and at least
            `channels_last_min_channels` channels, ``flat`` otherwise); ``channels_last`` and
            ``flat`` run on any strides, ``unit`` needs a unit W stride.
        unit_lanes, unit_warps: the unit kernel's lanes (one bin each) and warps per program.
        unit_channels: channels each unit lane reduces at once (sharing its bin's addresses): 1,
            2 or 4.
        unit_outputs_cached, unit_outputs_streamed: outputs per unit program when the input
            fits in L2 (each lane's bin geometry amortised over many channels) and when it does
            not (the planes that resident programs read together then stay in L2).
        min_programs_per_sm: the unit kernel halves its channels per program until the grid has
            this many programs per SM (or one round of channels is left).
        channels_last_bins, channels_last_bytes, channels_last_warps: the channels_last tile,
            [bins, channels of this many bytes], and its warps.
        channels_last_min_channels: fewer channels than this take the flat tile under ``auto``.
        flat_lanes, flat_warps: the flat tile's outputs (at least 16) and warps per program.
        backward_outputs, backward_outputs_streamed: grad_output elements per backward program
            when the accumulation buffer fits in L2, and when it does not (all ROIs of a block of
            channels then run together and add into planes that stay in L2).
        backward_warps: warps per backward program.
        gradient_layout: the layout of a channels_last input's gradient: ``"auto"`` writes it
            channels_last when the input has at least as many elements as grad_output (its
            atomics then land a channel stride apart, a cost per grad_output element, against a
            copy that costs per input element), else contiguous (which roi_ops copies).
    """

    kernel: str = "auto"
    unit_lanes: int = 256
    unit_warps: int = 8
    unit_channels: int = 4
    unit_outputs_cached: int = 8192
    unit_outputs_streamed: int = 1024
    min_programs_per_sm: int = 8
    channels_last_bins: int = 64
    channels_last_bytes: int = 128
    channels_last_warps: int = 4
    channels_last_min_channels: int = 8
    flat_lanes: int = 512
    flat_warps: int = 4
    backward_outputs: int = 2048
    backward_outputs_streamed: int = 512
    backward_warps: int = 4
    gradient_layout: str = "auto"

    def __post_init__(self) -> None:
        if self.kernel not in FORWARD_KERNELS:
            raise ValueError(f"kernel: expected one of {FORWARD_KERNELS}, got {self.kernel!r}")
        if self.gradient_layout not in GRADIENT_LAYOUTS:
            raise ValueError(
                f"gradient_layout: expected one of {GRADIENT_LAYOUTS}, got {self.gradient_layout!r}"
            )
        for name in _POWERS_OF_TWO:
            value = getattr(self, name)
            if not _power_of_two(value):
                raise ValueError(f"{name}: expected a power of two, got {value}")
        if self.unit_channels not in UNIT_CHANNELS:
            raise ValueError(
                f"unit_channels: expected one of {UNIT_CHANNELS}, got {self.unit_channels}"
            )
        for name in ("unit_outputs_cached", "unit_outputs_streamed", "min_programs_per_sm"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")


DEFAULT_TUNING = Tuning()
