"""`CupyBackend`: the roi_ops backend declaration. CuPy is imported lazily, never here."""

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

from . import planning


class CupyBackend(Backend):
    """CUDA C kernels compiled at run time by CuPy (NVRTC), launched on torch's current stream.

    Exact to the contract in all four float dtypes. One block per (ROI, channel block) computes
    the ROI's geometry once; NCHW-like inputs map threads to output elements (coalesced stores),
    channels_last inputs map threads to 16-byte vectors of adjacent channels (coalesced loads).
    Kernels are compiled once per device and dtype pair. The forward kernels record invalid ROIs
    in the bad-ROI log themselves. The backward sums with atomics (not run-to-run
    deterministic): under ``torch.use_deterministic_algorithms(True)`` roi_ops' shared
    deterministic backward runs instead. Multi-level (FPN) calls of up to eight levels run fused:
    one launch per direction for every level, each ROI's level read on the device.
    """

    name = "cupy"
    priority = 110
    device_types = frozenset({"cuda"})
    dtypes = ALL_FLOAT_DTYPES
    deterministic = True
    deterministic_backward = False
    reports_bad_rois = True
    description = "CUDA C kernels compiled by CuPy/NVRTC, run on torch's stream"
    gradient_formats = frozenset({torch.contiguous_format, torch.channels_last})

    def check_available(self) -> str | None:
        """Return why CuPy cannot run here (missing, broken, no CUDA device, no NVRTC), or None.

        Never raises.
        """
        try:
            import cupy
        except ImportError as error:
            return (
                f"CuPy is not installed ({error}); install cupy-cuda13x or the cupy-cudaXX wheel "
                "matching your CUDA"
            )
        except Exception as error:  # a broken install can raise anything on import
            return f"CuPy cannot be imported ({type(error).__name__}: {error})"
        if not torch.cuda.is_available():
            return "no CUDA device: torch.cuda.is_available() is False"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:
            return f"no CUDA device usable by CuPy ({type(error).__name__}: {error})"
        if count == 0:
            return "no CUDA device visible to CuPy"
        try:
            from cupy_backends.cuda.libs import nvrtc

            nvrtc.getVersion()
        except ImportError:
            pass  # a CuPy layout without this module: NVRTC problems surface at compile time
        except Exception as error:
            return f"CuPy cannot load NVRTC to compile kernels ({type(error).__name__}: {error})"
        try:
            from . import launch  # noqa: F401
        except Exception as error:
            return f"the CuPy launcher cannot be loaded ({type(error).__name__}: {error})"
        return None

    def not_supported_reasons(self, problem: RoIPoolProblem) -> list[str]:
        """Extend the device/dtype checks with the kernels' dtype pairs and size limits."""
        return super().not_supported_reasons(problem) + planning.unsupported_reasons(problem)

    def forward(
        self, problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Fill `output` (K, C, PH, PW) and, unless None, the int32 `argmax`, and record invalid
        ROIs in ``problem.bad_roi_log`` unless it is None; see `Backend.forward`."""
        from .launch import DEFAULT_LAUNCHER

        DEFAULT_LAUNCHER.forward(problem, output, argmax)

    def backward(self, problem: RoIPoolBackwardProblem) -> torch.Tensor:
        """grad_input by a scatter kernel that reads each ROI's batch index from
        ``problem.rois`` itself (not run-to-run deterministic; see `deterministic_backward`).

        Returns an (N, C, H, W) tensor of ``problem.input_dtype`` (float16/bfloat16 accumulated
        in float32), dense in ``problem.memory_format``: contiguous, or channels_last for
        channels_last inputs while the gradient fits in L2 (contiguous beyond).
        """
        from .launch import DEFAULT_LAUNCHER

        return DEFAULT_LAUNCHER.backward(problem)

    def multi_scale_not_supported_reasons(self, problem: MultiScaleRoIPoolProblem) -> list[str]:
        """Why the fused multi-level kernels cannot run `problem`: more than eight levels, or a
        dtype pair or size the kernels do not take (every layout runs fused)."""
        return planning.multi_scale_unsupported_reasons(problem)

    def forward_multi_scale(
        self, problem: MultiScaleRoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Fill `output` (K, C, PH, PW) and, unless None, the int32 `argmax` for every ROI from
        its level's map in one launch, recording invalid ROIs in ``problem.bad_roi_log`` unless
        it is None; reads no level on the host (see `Backend.forward_multi_scale`)."""
        from .launch import DEFAULT_LAUNCHER

        DEFAULT_LAUNCHER.forward_multi_scale(problem, output, argmax)

    def backward_multi_scale(self, problem: MultiScaleRoIPoolBackwardProblem) -> list[torch.Tensor]:
        """The L gradients by one launch of an atomic scatter into each ROI's level (not
        run-to-run deterministic; see `deterministic_backward`).

        Returns one (N, C, H_l, W_l) tensor of ``problem.input_dtype`` per level
        (float16/bfloat16 accumulated in float32 and rounded once), dense in its wanted memory
        format (channels_last ones contiguous instead when the gradients do not fit in L2).
        """
        from .launch import DEFAULT_LAUNCHER

        return DEFAULT_LAUNCHER.backward_multi_scale(problem)
