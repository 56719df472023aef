"""`TritonBackend`: bit-exact Triton kernels for CUDA GPUs, the portable GPU backend.

The CuPy backend (priority 110) is what ``auto`` picks on NVIDIA GPUs where it is installed;
Triton (priority 100) is the GPU backend that needs no CUDA toolkit at run time and runs
wherever Triton compiles, with the same contract and the same tests. This module does not
import Triton; the kernels (`roi_ops_triton.launch`) are imported on first use.
"""

from __future__ import annotations

import torch

from roi_ops.backend import (
    ALL_FLOAT_DTYPES,
    Backend,
    MultiScaleRoIPoolBackwardProblem,
    MultiScaleRoIPoolProblem,
    RoIPoolBackwardProblem,
    RoIPoolProblem,
)

from . import plan
from .interpreter import interpreting
from .tuning import DEFAULT_TUNING, Tuning


class TritonBackend(Backend):
    """roi_pool with Triton kernels on CUDA devices (and on CPU tensors under the interpreter).

    Forward: one kernel chosen by the input's strides, argmax on request (inference stores
    none); invalid ROIs are recorded in roi_ops' bad-ROI log by the kernel itself. Backward: an
    atomic scatter that writes the gradient in the input's layout (contiguous or channels_last);
    not run-to-run deterministic, so under ``torch.use_deterministic_algorithms(True)`` roi_ops
    runs its shared deterministic backward instead. Multi-level (FPN) calls whose levels all
    take the unit kernel, or all the channels_last kernel, run fused: one launch per direction
    over every level (`roi_ops_triton.multi_scale`).

    Args:
        tuning: launch sizes (`roi_ops_triton.tuning`); probes pass variants, roi_ops the
            default.
    """

    name = "triton"
    priority = 100
    device_types = frozenset({"cuda"})
    dtypes = ALL_FLOAT_DTYPES
    deterministic = True
    deterministic_backward = False
    reports_bad_rois = True
    description = "Triton kernels for CUDA GPUs (portable; no CUDA toolkit needed)"
    gradient_formats = frozenset({torch.contiguous_format, torch.channels_last})

    def __init__(self, tuning: Tuning = DEFAULT_TUNING) -> None:
        self.tuning = tuning
        self._runner = None
        self._multi_scale_runner = None

    def check_available(self) -> str | None:
        """Return why Triton cannot run here (missing, broken, or no CUDA device), else None."""
        try:
            # Not the kernels: they fix compiled-vs-interpreted at import, so they are imported
            # on the first forward, under the environment of that call.
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
        """The base checks, with CPU tensors accepted while ``TRITON_INTERPRET`` is on.

        ``device_types`` stays {"cuda"}: roi_ops' ``auto`` only picks backends that declare the
        device, so the interpreter runs CPU tensors only when ``triton`` is named.
        """
        reasons = super().not_supported_reasons(problem)
        if reasons and problem.input.device.type == "cpu" and interpreting():
            reasons = [r for r in reasons if not r.startswith("device type 'cpu'")]
        return reasons

    def forward(
        self, problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Write roi_pool of `problem` into `output` (and `argmax` unless None), and record its
        invalid ROIs in ``problem.bad_roi_log`` unless that is None.

        Launches on ``problem.device`` and torch's current stream there, without waiting.
        Invalid ROIs (batch index outside [0, N) or non-finite values) give zeros and argmax -1
        without any out-of-bounds access. The log may be pinned host memory.
        """
        self._kernels().forward(problem, output, argmax)

    def backward(self, problem: RoIPoolBackwardProblem) -> torch.Tensor:
        """Atomic scatter of ``grad_output`` at ``argmax`` into the image that each ROI row of
        ``problem.rois`` names (not run-to-run deterministic). Shapes and dtypes as in
        `Backend.backward`."""
        return self._kernels().backward(problem)

    def multi_scale_not_supported_reasons(self, problem: MultiScaleRoIPoolProblem) -> list[str]:
        """Why `problem` cannot run fused (empty: it can): the single-level checks of level 0,
        and `plan.multi_scale_kernel` (at most `plan.MAX_LEVELS` levels, every level with
        pixels, all NCHW or all channels_last). roi_ops otherwise pools level by level."""
        features = problem.features
        reasons = self.not_supported_reasons(problem.level(0))
        _, layout_reasons = plan.multi_scale_kernel(
            [f.stride() for f in features],
            features[0].shape[1],
            [f.shape[0] * f.shape[2] * f.shape[3] for f in features],
            self.tuning,
        )
        return reasons + layout_reasons

    def forward_multi_scale(
        self, problem: MultiScaleRoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Write every ROI's roi_pool on its level into `output` (and `argmax` unless None) in
        one launch, and record invalid ROIs in ``problem.bad_roi_log`` unless that is None.
        Rows of level -1 get zeros and argmax -1. Launches without waiting; the levels are read
        on the device."""
        self._multi_scale_kernels().forward(problem, output, argmax)

    def backward_multi_scale(self, problem: MultiScaleRoIPoolBackwardProblem) -> list[torch.Tensor]:
        """The L gradients of a fused forward: one atomic scatter into every level (not
        run-to-run deterministic). Each is (N, C, H_l, W_l) of ``problem.input_dtype``."""
        return self._multi_scale_kernels().backward(problem)

    def _multi_scale_kernels(self):
        runner = self._multi_scale_runner
        if runner is None:
            from .multi_scale import MultiScaleRunner

            runner = self._multi_scale_runner = MultiScaleRunner(self.tuning)
        return runner

    def _kernels(self):
        runner = self._runner
        if runner is None:
            from .launch import Runner

            runner = self._runner = Runner(self.tuning)
        return runner
