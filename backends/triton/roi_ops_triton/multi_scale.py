"""Host side of fused multi-level (FPN) calls: one forward launch and one backward launch over
every pyramid level (`roi_ops_triton.multi_scale_kernels`).

A `MultiScaleRunner` plans each call shape once, as `launch.Runner` does for one level (the
levels' shapes, strides and 16-byte alignment, the scales, dtypes, which outputs are wanted;
all but K and the data), and launches without synchronising: the level of each ROI is read by
the kernels, never on the host. Levels past the real ones repeat level 0's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from roi_ops.backend import (
    MultiScaleRoIPoolBackwardProblem,
    MultiScaleRoIPoolProblem,
    accumulate_dtype,
)

from . import launch, plan
from .multi_scale_kernels import (
    MAX_LEVELS,
    roi_pool_backward_scatter_levels,
    roi_pool_forward_channels_last_levels,
    roi_pool_forward_unit_levels,
)
from .tuning import DEFAULT_TUNING, Tuning

_FORWARD_KERNELS = {
    "unit": roi_pool_forward_unit_levels,
    "channels_last": roi_pool_forward_channels_last_levels,
}


@dataclass(eq=False)
class MultiScaleBackwardPlan:
    """How multi-level backward calls of one shape run: each level's gradient buffer, and the
    scatter's launch (`launch.launch_kernel` reads kernel, scalars, meta, device_index)."""

    kernel: Any
    shapes: tuple[tuple[int, int, int, int], ...]
    formats: tuple[torch.memory_format, ...]
    accumulate: torch.dtype
    scalars: tuple
    meta: dict[str, Any]
    blocks: int  # 0: nothing to scatter
    device_index: int


class MultiScaleRunner:
    """Plans and launches the fused multi-level kernels with one `Tuning`."""

    def __init__(self, tuning: Tuning = DEFAULT_TUNING) -> None:
        self.tuning = tuning
        self._forward_plans: dict[tuple, launch.ForwardPlan] = {}
        self._backward_plans: dict[tuple, MultiScaleBackwardPlan] = {}

    def forward(
        self, problem: MultiScaleRoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Fill `output` (and `argmax` unless None) for every ROI from its level, and record
        invalid ROIs in ``problem.bad_roi_log`` unless that is None.

        Args:
            problem: a call the backend fuses (`plan.multi_scale_kernel` finds no reason
                against it); levels (K,) int64.
            output: contiguous (K, C, PH, PW) of the features' dtype; every element is written.
            argmax: contiguous (K, C, PH, PW) int32, or None.
        """
        features = problem.features
        rois = problem.rois
        levels = problem.levels.contiguous()
        log = problem.bad_roi_log
        num_rois = rois.shape[0]
        if num_rois == 0:
            return
        key = (
            features[0].device, features[0].dtype, rois.dtype, rois.stride(),
            tuple((f.shape, f.stride(), f.data_ptr() & 15) for f in features),
            problem.pooled_height, problem.pooled_width, problem.spatial_scales,
            rois.data_ptr() & 15, levels.data_ptr() & 15, output.data_ptr() & 15,
            -1 if argmax is None else argmax.data_ptr() & 15,
            -1 if log is None else log.data_ptr() & 15,
        )  # fmt: skip
        found = self._forward_plans.get(key)
        if found is None:
            found = self.plan_forward(problem, argmax is not None, log is not None)
            launch.store_plan(self._forward_plans, key, found)
        padded = (*features, *(features[0],) * (MAX_LEVELS - len(features)))
        pointers = (
            *padded, rois, levels, output, output if argmax is None else argmax,
            output if log is None else launch.log_argument(log, features[0]),
        )  # fmt: skip
        launch.launch_forward(found, num_rois, pointers, self.tuning)

    def plan_forward(
        self, problem: MultiScaleRoIPoolProblem, needs_argmax: bool, reports: bool
    ) -> launch.ForwardPlan:
        """The plan for multi-level calls shaped like `problem` (not cached).

        Raises:
            ValueError: `problem` has no fused launch (`plan.multi_scale_kernel`).
        """
        features = list(problem.features)
        rois = problem.rois
        first = features[0]
        num_images, channels = first.shape[:2]
        bins = problem.pooled_height * problem.pooled_width
        device_index = launch.device_index_of(first.device)
        tuning = self.tuning
        name, why = plan.multi_scale_kernel(
            [f.stride() for f in features],
            channels,
            [f.shape[0] * f.shape[2] * f.shape[3] for f in features],
            tuning,
        )
        if name is None:
            raise ValueError(f"problem: no fused multi-level launch ({'; '.join(why)})")
        per_level = []
        for level in range(MAX_LEVELS):
            feature = features[level] if level < len(features) else first
            scale = problem.spatial_scales[level if level < len(features) else 0]
            per_level += [*feature.shape[2:], *feature.stride(), *launch.scale_arguments(scale)]
        scalars = (num_images, channels, problem.pooled_height, problem.pooled_width,
                   *rois.stride(), *per_level)  # fmt: skip
        meta = launch.dtype_flags(first.dtype, rois.dtype)
        meta["LEVELS"] = len(features)
        unit = None
        if name == "unit":
            input_bytes = sum(f.numel() * f.element_size() for f in features)
            sizes, blocks, unit, warps = launch.unit_sizes(
                channels, bins, input_bytes, device_index, tuning
            )
        else:
            sizes, blocks, warps = launch.channels_last_sizes(features, bins, tuning)
        meta.update(sizes)
        meta.update(launch.forward_options(needs_argmax, reports, warps))
        kernel = _FORWARD_KERNELS[name]
        return launch.ForwardPlan(kernel, name, scalars, meta, blocks, unit, device_index)

    def backward(self, problem: MultiScaleRoIPoolBackwardProblem) -> list[torch.Tensor]:
        """The L gradients: grad_output scattered at the argmax into the level and image of each
        ROI with atomic adds (one launch; float16/bfloat16 summed in float32, rounded once).

        Returns:
            L tensors (N, C, H_l, W_l) of ``problem.input_dtype``, each dense in its
            ``problem.memory_formats`` entry or, where `plan.channels_last_gradient` declines a
            channels_last one, contiguous.
        """
        grad_output = problem.grad_output
        argmax = problem.argmax
        rois = problem.rois
        levels = problem.levels.contiguous()
        key = (
            grad_output.device, grad_output.dtype, grad_output.shape, grad_output.stride(),
            rois.dtype, rois.stride(), problem.input_shapes, problem.input_dtype,
            problem.memory_formats, grad_output.data_ptr() & 15, argmax.data_ptr() & 15,
            rois.data_ptr() & 15, levels.data_ptr() & 15,
        )  # fmt: skip
        found = self._backward_plans.get(key)
        if found is None:
            found = self.plan_backward(problem)
            launch.store_plan(self._backward_plans, key, found)
        device = grad_output.device
        grads = [
            torch.empty(shape, dtype=found.accumulate, device=device, memory_format=fmt).zero_()
            for shape, fmt in zip(found.shapes, found.formats, strict=True)
        ]
        if found.blocks:
            padded = (*grads, *(grads[0],) * (MAX_LEVELS - len(grads)))
            pointers = (grad_output, argmax, rois, levels, *padded)
            extra = tuple(grad.data_ptr() & 15 for grad in grads)
            launch.launch_kernel(found, argmax.shape[0], found.blocks, pointers, (), extra)
        if found.accumulate != problem.input_dtype:
            return [grad.to(problem.input_dtype) for grad in grads]
        return grads

    def plan_backward(self, problem: MultiScaleRoIPoolBackwardProblem) -> MultiScaleBackwardPlan:
        """The plan for multi-level backward calls shaped like `problem` (not cached)."""
        tuning = self.tuning
        grad_output = problem.grad_output
        shapes = problem.input_shapes
        num_images, channels = shapes[0][:2]
        _, _, pooled_height, pooled_width = problem.argmax.shape
        device_index = launch.device_index_of(grad_output.device)
        accumulate = accumulate_dtype(problem.input_dtype)
        formats = []
        per_level = []
        for level in range(MAX_LEVELS):
            n, c, h, w = shapes[level if level < len(shapes) else 0]
            channels_last = problem.memory_formats[
                level if level < len(shapes) else 0
            ] == torch.channels_last and plan.channels_last_gradient(
                n * c * h * w, problem.argmax.numel(), tuning
            )
            if level < len(shapes):
                formats.append(torch.channels_last if channels_last else torch.contiguous_format)
            # (image, channel, argmax) strides of the dense gradient
            per_level += [c * h * w, 1, c] if channels_last else [c * h * w, h * w, 1]
        total_elements = sum(n * c * h * w for n, c, h, w in shapes)
        blocks, meta = launch.scatter_sizes(
            problem, total_elements, accumulate, device_index, tuning, {"LEVELS": len(shapes)}
        )
        scalars = (num_images, channels, pooled_height, pooled_width, *grad_output.stride(),
                   problem.rois.stride(0), *per_level)  # fmt: skip
        return MultiScaleBackwardPlan(
            roi_pool_backward_scatter_levels, tuple(shapes), tuple(formats), accumulate,
            scalars, meta, blocks, device_index,
        )  # fmt: skip
