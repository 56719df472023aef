"""`NumbaBackend`: the roi_ops backend declaration. numba is imported lazily, never here."""

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

from roi_ops_numba.tuning import DEFAULT_TUNING, NumbaTuning

_MIN_NUMBA = (0, 57)  # numba.set_parallel_chunksize


class NumbaBackend(Backend):
    """Parallel CPU roi_pool compiled with numba; exact to the contract in all float dtypes.

    Reads contiguous and channels_last inputs in place (any strides work; NCHW through small
    per-thread staging buffers, never a copy of the input), splits the work into tasks (a group
    of one image's ROIs or one ROI, and a block of channels) scheduled dynamically over
    ``torch.get_num_threads()`` threads (or numba's own setting when the environment sets
    ``NUMBA_NUM_THREADS``); small calls run in the calling thread. Records invalid ROIs in the
    bad-ROI log itself and has its own deterministic backward. Pools every level of a feature
    pyramid in one pass (`forward_multi_scale`, `backward_multi_scale`). Kernels are compiled on
    first use and cached on disk.

    Args:
        tuning: how the kernels split and stage the work (`NumbaTuning`); the default is the
            measured one.
    """

    name = "numba"
    priority = 50
    device_types = frozenset({"cpu"})
    dtypes = ALL_FLOAT_DTYPES
    deterministic = True
    deterministic_backward = True
    reports_bad_rois = True
    description = "parallel CPU kernels compiled with numba (cached on disk)"

    def __init__(self, tuning: NumbaTuning = DEFAULT_TUNING) -> None:
        self.tuning = tuning

    def check_available(self) -> str | None:
        """Return why numba cannot be used (missing, too old or broken), or None."""
        try:
            import numba
        except Exception as exc:  # ImportError, or a broken install raising anything
            return f"numba cannot be imported ({type(exc).__name__}: {exc})"
        version = tuple(int(part) for part in numba.__version__.split(".")[:2] if part.isdigit())
        if version < _MIN_NUMBA:
            wanted = ".".join(map(str, _MIN_NUMBA))
            return f"numba {numba.__version__} is too old (need >= {wanted})"
        try:
            from roi_ops_numba import ops  # noqa: F401
        except Exception as exc:
            return f"the numba kernels cannot be loaded ({type(exc).__name__}: {exc})"
        return None

    def forward(
        self, problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Fill `output` (K, C, PH, PW) and, unless None, the int32 `argmax`; see `Backend`.

        Records the first invalid ROI in ``problem.bad_roi_log`` when it is not None.
        """
        from roi_ops_numba import ops

        ops.forward(problem, output, argmax, self.tuning)

    def backward(self, problem: RoIPoolBackwardProblem) -> torch.Tensor:
        """Deterministic grad_input: each (image, channel) plane is summed by one thread.

        Returns a contiguous (N, C, H, W) tensor of ``problem.input_dtype``; float16/bfloat16
        gradients are accumulated in float32 and rounded once.
        """
        from roi_ops_numba import ops

        return ops.backward(problem, self.tuning)

    def multi_scale_not_supported_reasons(self, problem: MultiScaleRoIPoolProblem) -> list[str]:
        """Empty (the fused kernels run every layout and dtype), unless the levels' memory
        cannot be addressed from one base (`memory.same_base_misfit`) or a level is not
        supported on its own."""
        from roi_ops_numba.memory import same_base_misfit

        reasons = self.not_supported_reasons(problem.level(0))
        misfit = same_base_misfit(problem.features)
        if misfit is not None:
            reasons.append(misfit)
        return reasons

    def forward_multi_scale(
        self, problem: MultiScaleRoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Fill `output` (K, C, PH, PW) and, unless None, the int32 `argmax` for the ROIs of
        every level in one pass (rows without a level: zeros, argmax -1); see `Backend`.

        Records the first invalid ROI in ``problem.bad_roi_log`` when it is not None.
        """
        from roi_ops_numba import ops

        ops.forward(problem, output, argmax, self.tuning)

    def backward_multi_scale(self, problem: MultiScaleRoIPoolBackwardProblem) -> list[torch.Tensor]:
        """The L deterministic level gradients in one pass: each (level, image, channel) plane
        is summed by one thread, in ROI order.

        Returns contiguous (N, C, H_l, W_l) tensors of ``problem.input_dtype``; float16/bfloat16
        gradients are accumulated in float32 and rounded once.
        """
        from roi_ops_numba import ops

        return ops.backward_multi_scale(problem, self.tuning)
