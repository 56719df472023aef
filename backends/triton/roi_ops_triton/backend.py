"""`TritonBackend`: roi_ops' default GPU backend, bit-exact Triton kernels.

This module does not import Triton; `roi_ops_triton.kernels` is imported on first use.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from roi_ops.backend import ALL_FLOAT_DTYPES, Backend, RoIPoolBackwardProblem, RoIPoolProblem


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    """roi_pool with Triton kernels on CUDA devices (and on CPU tensors under the interpreter).

    Forward: one kernel, argmax on request (inference stores none). Backward: an atomic scatter
    kernel that writes the gradient in the input's layout (contiguous or channels_last), or,
    under ``torch.use_deterministic_algorithms(True)``, roi_ops' shared deterministic backward.
    """

    name: ClassVar[str] = "triton"
    priority: ClassVar[int] = 100
    device_types: ClassVar[frozenset[str]] = frozenset({"cuda"})
    dtypes: ClassVar[frozenset[torch.dtype]] = ALL_FLOAT_DTYPES
    deterministic: ClassVar[bool] = True
    deterministic_backward: ClassVar[bool] = False
    description: ClassVar[str] = "Triton kernels for CUDA GPUs (default GPU backend)"
    gradient_formats: ClassVar[frozenset[torch.memory_format]] = frozenset(
        {torch.contiguous_format, torch.channels_last}
    )

    def check_available(self) -> str | None:
        """Return why Triton cannot run here (missing, broken, or no CUDA device), else None."""
        try:
            # Not the kernels module: it fixes compiled-vs-interpreted at import, so it is
            # imported on the first forward, under the environment of that call.
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # a broken install can raise more than ImportError
            return f"triton is not usable: {type(exc).__name__}: {exc}"
        if interpreting():
            return None
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        return None

    def not_supported_reasons(self, problem: RoIPoolProblem) -> list[str]:
        """The base checks, with CPU tensors accepted while ``TRITON_INTERPRET=1``.

        ``device_types`` stays {"cuda"}: roi_ops' ``auto`` only picks backends that declare the
        device, so the interpreter runs CPU tensors only when ``triton`` is named.
        """
        reasons = super().not_supported_reasons(problem)
        if interpreting() and problem.device.type == "cpu":
            reasons = [r for r in reasons if not r.startswith("device type 'cpu'")]
        return reasons

    def forward(
        self, problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Write roi_pool of `problem` into `output` (and `argmax` unless None).

        Launches on ``problem.device`` and torch's current stream. Invalid ROIs (batch index
        outside [0, N) or non-finite values) give zeros and argmax -1 without any
        out-of-bounds access, so this is safe with roi_ops' value checks off.
        """
        from roi_ops_triton import kernels

        kernels.roi_pool_forward(
            problem.input,
            problem.rois,
            problem.pooled_height,
            problem.pooled_width,
            problem.spatial_scale,
            output,
            argmax,
        )

    def backward(self, problem: RoIPoolBackwardProblem) -> torch.Tensor:
        """Atomic scatter of ``grad_output`` at ``argmax`` (not run-to-run deterministic: roi_ops
        runs its shared deterministic backward instead under
        ``torch.use_deterministic_algorithms``). Shapes and dtypes as in `Backend.backward`."""
        from roi_ops_triton import kernels

        return kernels.roi_pool_backward(
            problem.grad_output,
            problem.argmax,
            problem.batch_index,
            problem.input_shape,
            problem.input_dtype,
            problem.memory_format,
        )
