"""The `Backend` base class that every roi_ops backend, first-party or third-party, subclasses.

A backend is a small declaration (name, priority, devices, dtypes, determinism) plus three
methods. Heavy imports (numba, Triton, CuPy) belong in a separate kernel module that the backend
imports lazily from `check_available` and `forward`, so that importing roi_ops stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

ALL_FLOAT_DTYPES: frozenset[torch.dtype] = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64}
)


@dataclass(frozen=True)
class RoIPoolProblem:
    """One validated roi_pool call, as a backend sees it.

    Attributes:
        input: (N, C, H, W) float tensor, any strides (contiguous and channels_last are common).
        rois: (K, 5) tensor of rows (batch_index, x1, y1, x2, y2); dtype equal to ``input``'s, or
            float32 when ``input`` is float16/bfloat16. Same device as ``input``.
        pooled_height, pooled_width: output bins per ROI, each >= 1.
        spatial_scale: finite, > 0; maps ROI coordinates onto the feature map.
        needs_argmax: True when a gradient will be needed, so the argmax must be produced.
    """

    input: torch.Tensor
    rois: torch.Tensor
    pooled_height: int
    pooled_width: int
    spatial_scale: float
    needs_argmax: bool

    @property
    def device(self) -> torch.device:
        return self.input.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input.dtype

    @property
    def num_rois(self) -> int:
        return self.rois.shape[0]

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        _, channels, _, _ = self.input.shape
        return (self.num_rois, channels, self.pooled_height, self.pooled_width)


class Backend:
    """Base class for roi_pool backends.

    Subclasses set the class attributes and implement `forward`; they may override
    `check_available`, `not_supported_reasons` and `backward`. Register a backend through the
    ``roi_ops.backends`` entry-point group (``name = "module:Class"``) or, in-process, with
    `roi_ops.register_backend`.

    Class attributes:
        name: the name users pass as ``backend=``; must match the entry-point name.
        priority: higher wins when ``backend="auto"`` chooses among usable backends.
        device_types: torch device types it runs on (``"cpu"``, ``"cuda"``, ...); ``"*"`` = any.
        dtypes: input dtypes it supports.
        deterministic: whether its forward and backward give run-to-run identical results.
        description: one line for `roi_ops.list_backends()` and ``python -m roi_ops info``.
        gradient_formats: memory formats `backward` can return grad_input in. roi_ops asks for
            ``torch.channels_last`` (for a channels_last input) only from a backend that lists
            it; whatever layout comes back, roi_ops copies it into the input's when it differs.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    device_types: ClassVar[frozenset[str]] = frozenset({"cpu"})
    dtypes: ClassVar[frozenset[torch.dtype]] = ALL_FLOAT_DTYPES
    deterministic: ClassVar[bool] = True
    description: ClassVar[str] = ""
    gradient_formats: ClassVar[frozenset[torch.memory_format]] = frozenset(
        {torch.contiguous_format}
    )

    def check_available(self) -> str | None:
        """Return why this backend cannot run in this process at all, or None if it can.

        Called once and cached. Import heavy dependencies here (lazily), never at module import.
        """
        return None

    def not_supported_reasons(self, problem: RoIPoolProblem) -> list[str]:
        """Return the reasons this backend cannot run `problem`; an empty list means usable.

        The default checks the device type and dtype against the class attributes. Overrides
        should extend ``super().not_supported_reasons(problem)``.
        """
        reasons = []
        device_type = problem.device.type
        if "*" not in self.device_types and device_type not in self.device_types:
            supported = ", ".join(sorted(self.device_types))
            reasons.append(f"device type {device_type!r} not supported (supports: {supported})")
        if problem.dtype not in self.dtypes:
            supported = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            dtype_name = str(problem.dtype).removeprefix("torch.")
            reasons.append(f"dtype {dtype_name} not supported (supports: {supported})")
        return reasons

    def forward(
        self, problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Compute roi_pool for `problem`, writing every element of `output` (and `argmax`).

        Args:
            problem: the validated call.
            output: contiguous (K, C, PH, PW) tensor of the input's dtype, uninitialised (tests
                poison it): every element must be written.
            argmax: contiguous (K, C, PH, PW) int32 tensor to fill with ``h * W + w`` (-1 for an
                empty bin or an invalid ROI), or None when ``problem.needs_argmax`` is False.

        Must launch on ``problem.device`` and, on CUDA, on torch's current stream.
        """
        raise NotImplementedError

    def backward(
        self,
        grad_output: torch.Tensor,
        argmax: torch.Tensor,
        batch_index: torch.Tensor,
        input_shape: tuple[int, int, int, int],
        input_dtype: torch.dtype,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> torch.Tensor | None:
        """Return grad_input, or None to use roi_ops' shared (deterministic) backward.

        Args:
            grad_output: (K, C, PH, PW), any strides (zero strides included).
            argmax: contiguous (K, C, PH, PW) int32 from `forward`; -1 means no gradient.
            batch_index: (K,) int64, each in [0, N) (clamped; rows whose argmax is -1 may have
                any value in range).
            input_shape: (N, C, H, W).
            input_dtype: dtype of the returned (N, C, H, W) gradient. float16 and bfloat16
                gradients must be accumulated in float32 and rounded once. The result must be
                run-to-run identical when ``torch.are_deterministic_algorithms_enabled()``.
            memory_format: the layout wanted: contiguous, or ``torch.channels_last`` for a
                channels_last input when the backend lists it in `gradient_formats` (only then
                is the argument passed, so a backend that lists only contiguous_format may omit
                the parameter). A backend may still return a contiguous gradient where that is
                faster (roi_ops then copies it into channels_last, as autograd would).
        """
        return None
