"""Host side: plan the Triton kernels for a roi_ops problem and launch them.

A `Runner` holds one `Tuning`. It plans a call once per *call shape* (device, dtypes, shapes,
strides, output size, scale, which outputs are wanted, the pointers' 16-byte alignment: all but
K and the data itself) and keeps the plan, so that a repeated call only looks its plan up,
sizes the grid for its K and starts the compiled kernel (`roi_ops_triton.launch_cache`, keyed
by the plan). Launches go to the tensors' device and torch's current stream on it, without
synchronising. Grid axis 1 is split into launches of at most `MAX_GRID_Y` blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from roi_ops.backend import (
    MultiScaleRoIPoolBackwardProblem,
    RoIPoolBackwardProblem,
    RoIPoolProblem,
    accumulate_dtype,
)
from roi_ops.device_info import cuda_sizes
from roi_ops.layout import aligned_channel_vector

from . import launch_cache, plan
from .backward import roi_pool_backward_scatter
from .forward import (
    record_bad_rois,
    roi_pool_forward_channels_last,
    roi_pool_forward_flat,
    roi_pool_forward_unit,
)
from .tuning import DEFAULT_TUNING, Tuning

MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1
VECTOR_BYTES = 16  # the widest load of the channels_last kernel

_FORWARD_KERNELS = {
    "unit": roi_pool_forward_unit,
    "channels_last": roi_pool_forward_channels_last,
    "flat": roi_pool_forward_flat,
}


class UnitSizes(NamedTuple):
    """What the unit kernel's channels per program depend on (`plan.unit_channels_per_program`),
    and their value when K is large enough that the grid has the programs it wants."""

    sizes: tuple[int, int, int, int]  # (channels, bins, SM count, target outputs)
    channels_per_program: int  # `plan.unit_channels_most`, when K * blocks >= enough_programs
    enough_programs: int


@dataclass(eq=False)  # hashed by identity: a plan is part of its launches' cache keys
class ForwardPlan:
    """How calls of one shape run (see `Runner.forward`).

    Attributes:
        kernel: the forward kernel (None: the input has no pixel or no channel; outputs are
            filled on the host and only bad ROIs are recorded).
        name: ``"unit"``, ``"channels_last"``, ``"flat"`` or ``"empty"``.
        scalars: the kernel's runtime arguments from N to scale_bits.
        meta: its constexpr arguments and launch options.
        blocks: programs per ROI (for the unit kernel, with enough ROIs: see `UnitSizes`).
        unit: the unit kernel's sizes, else None.
        device_index: the CUDA device (-1 for CPU tensors under the interpreter).
    """

    kernel: Any
    name: str
    scalars: tuple
    meta: dict[str, Any]
    blocks: int
    unit: UnitSizes | None
    device_index: int


@dataclass(eq=False)
class BackwardPlan:
    """How backward calls of one shape run: the gradient's buffer and the scatter's launch."""

    kernel: Any
    shape: tuple[int, int, int, int]
    accumulate: torch.dtype
    memory_format: torch.memory_format
    scalars: tuple
    meta: dict[str, Any]
    blocks: int  # 0: nothing to scatter
    device_index: int


class _HostMapped:
    """A pointer argument for memory the device reaches through its address although torch
    calls it a CPU tensor (pinned host memory, such as roi_ops' bad-ROI log): what Triton needs
    of a tensor argument, its address and element type."""

    __slots__ = ("_address", "dtype")

    def __init__(self, tensor: torch.Tensor) -> None:
        self._address = tensor.data_ptr()
        self.dtype = tensor.dtype

    def data_ptr(self) -> int:
        return self._address


class Runner:
    """Plans and launches the Triton kernels with one `Tuning` (see the module docstring)."""

    def __init__(self, tuning: Tuning = DEFAULT_TUNING) -> None:
        self.tuning = tuning
        self._forward_plans: dict[tuple, ForwardPlan] = {}
        self._backward_plans: dict[tuple, BackwardPlan] = {}

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------

    def forward(
        self, problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Fill `output` (and `argmax` unless None) with roi_pool of `problem`, and record its
        invalid ROIs in ``problem.bad_roi_log`` unless that is None.

        Args:
            problem: input (N, C, H, W) of any strides with H * W < 2^31; rois (K, 5).
            output: contiguous (K, C, PH, PW) of the input's dtype; every element is written.
            argmax: contiguous (K, C, PH, PW) int32, or None to skip the argmax.
        """
        input = problem.input
        rois = problem.rois
        log = problem.bad_roi_log
        num_rois = rois.shape[0]
        if num_rois == 0:
            return
        key = (
            input.device, input.dtype, rois.dtype, input.shape, input.stride(), rois.stride(),
            problem.pooled_height, problem.pooled_width, problem.spatial_scale,
            input.data_ptr() & 15, rois.data_ptr() & 15, output.data_ptr() & 15,
            -1 if argmax is None else argmax.data_ptr() & 15,
            -1 if log is None else log.data_ptr() & 15,
        )  # fmt: skip
        found = self._forward_plans.get(key)
        if found is None:
            found = self.plan_forward(problem, argmax is not None, log is not None)
            store_plan(self._forward_plans, key, found)
        log_pointer = output if log is None else log_argument(log, input)
        if found.kernel is None:
            _fill_empty(output, argmax)
            if log is not None:
                _record_only(rois, log_pointer, input.shape[0], found.device_index)
            return
        pointers = (input, rois, output, output if argmax is None else argmax, log_pointer)
        launch_forward(found, num_rois, pointers, self.tuning)

    def plan_forward(
        self, problem: RoIPoolProblem, needs_argmax: bool, reports: bool
    ) -> ForwardPlan:
        """The plan for calls shaped like `problem` (not cached; `forward` caches its plans)."""
        input = problem.input
        rois = problem.rois
        _, channels, _, _ = input.shape
        height, width = problem.pooled_height, problem.pooled_width
        bins = height * width
        device_index = device_index_of(input.device)
        if input.numel() == 0:
            return ForwardPlan(None, "empty", (), {}, 0, None, device_index)
        tuning = self.tuning
        name = plan.forward_kernel(input.stride(), channels, tuning)
        scalars = (*input.shape, height, width, *input.stride(), *rois.stride(),
                   *scale_arguments(problem.spatial_scale))  # fmt: skip
        meta = dtype_flags(input.dtype, rois.dtype)
        unit = None
        if name == "unit":
            input_bytes = input.numel() * input.element_size()
            sizes, blocks, unit, warps = unit_sizes(
                channels, bins, input_bytes, device_index, tuning
            )
        elif name == "channels_last":
            sizes, blocks, warps = channels_last_sizes([input], bins, tuning)
        else:
            lanes = plan.flat_lanes(channels, bins, tuning)
            sizes, blocks, warps = (
                {"LANES": lanes},
                -(-(channels * bins) // lanes),
                tuning.flat_warps,
            )
        meta.update(sizes)
        meta.update(forward_options(needs_argmax, reports, warps))
        return ForwardPlan(_FORWARD_KERNELS[name], name, scalars, meta, blocks, unit, device_index)

    # ----------------------------------------------------------------------------------------
    # Backward
    # ----------------------------------------------------------------------------------------

    def backward(self, problem: RoIPoolBackwardProblem) -> torch.Tensor:
        """grad_input: grad_output scattered at the argmax with atomic adds, into the image each
        ROI row names (read from ``problem.rois`` in the kernel). float16/bfloat16 accumulate in
        float32, rounded once.

        Returns:
            (N, C, H, W) of ``problem.input_dtype``, dense in ``problem.memory_format`` or, for
            a channels_last request that `plan.channels_last_gradient` declines, contiguous.
        """
        grad_output = problem.grad_output
        argmax = problem.argmax
        rois = problem.rois
        key = (
            grad_output.device, grad_output.dtype, grad_output.shape, grad_output.stride(),
            rois.dtype, rois.stride(), problem.input_shape, problem.input_dtype,
            problem.memory_format, grad_output.data_ptr() & 15, argmax.data_ptr() & 15,
            rois.data_ptr() & 15,
        )  # fmt: skip
        found = self._backward_plans.get(key)
        if found is None:
            found = self.plan_backward(problem)
            store_plan(self._backward_plans, key, found)
        grad_input = torch.empty(
            found.shape,
            dtype=found.accumulate,
            device=grad_output.device,
            memory_format=found.memory_format,
        ).zero_()
        if found.blocks:
            pointers = (grad_output, argmax, rois, grad_input)
            extra = (grad_input.data_ptr() & 15,)
            launch_kernel(found, argmax.shape[0], found.blocks, pointers, (), extra)
        if grad_input.dtype != problem.input_dtype:
            return grad_input.to(problem.input_dtype)
        return grad_input

    def plan_backward(self, problem: RoIPoolBackwardProblem) -> BackwardPlan:
        """The plan for backward calls shaped like `problem` (not cached)."""
        tuning = self.tuning
        grad_output = problem.grad_output
        num_images, channels, height, width = problem.input_shape
        _, _, pooled_height, pooled_width = problem.argmax.shape
        device_index = device_index_of(grad_output.device)
        accumulate = accumulate_dtype(problem.input_dtype)
        memory_format = problem.memory_format
        input_elements = num_images * channels * height * width
        if memory_format == torch.channels_last and not plan.channels_last_gradient(
            input_elements, problem.argmax.numel(), tuning
        ):
            memory_format = torch.contiguous_format
        layout = {"CHANNELS_LAST": memory_format == torch.channels_last}
        blocks, meta = scatter_sizes(
            problem, input_elements, accumulate, device_index, tuning, layout
        )
        scalars = (num_images, channels, height * width, pooled_height, pooled_width,
                   *grad_output.stride(), problem.rois.stride(0))  # fmt: skip
        return BackwardPlan(
            roi_pool_backward_scatter, tuple(problem.input_shape), accumulate, memory_format,
            scalars, meta, blocks, device_index,
        )  # fmt: skip


_MAX_PLANS = 1024


def store_plan(plans: dict[tuple, Any], key: tuple, found: Any) -> None:
    """Keep plan `found` under `key`, emptying `plans` first when it is full: a run of ever new
    call shapes must not grow it without bound."""
    if len(plans) >= _MAX_PLANS:
        plans.clear()
    plans[key] = found


def device_index_of(device: torch.device) -> int:
    """The CUDA device's index, or -1 for CPU tensors (interpreter)."""
    return device.index if device.type == "cuda" else -1


def log_argument(log: torch.Tensor, input: torch.Tensor) -> Any:
    """The bad-ROI log as a kernel argument: itself, or its address where it is pinned host
    memory and the kernel runs on CUDA."""
    if input.device.type == "cuda" and log.device.type != "cuda":
        return _HostMapped(log)
    return log


def device_sizes(device_index: int) -> tuple[int, int]:
    """(SM count, L2 bytes) of a CUDA device; (1, 0) for CPU tensors (interpreter)."""
    if device_index < 0:
        return 1, 0
    sizes = cuda_sizes(device_index)
    return sizes.multiprocessors, sizes.l2_bytes


@functools.lru_cache(maxsize=64)
def scale_arguments(spatial_scale: float) -> tuple[float, int]:
    """(float32(spatial_scale), the float64's bits as int64): the kernel takes either exactly."""
    as_float32 = float(torch.tensor(spatial_scale, dtype=torch.float32))
    bits = torch.tensor(spatial_scale, dtype=torch.float64).view(torch.int64).item()
    return as_float32, bits


def scatter_sizes(
    problem: RoIPoolBackwardProblem | MultiScaleRoIPoolBackwardProblem,
    gradient_elements: int,
    accumulate: torch.dtype,
    device_index: int,
    tuning: Tuning,
    layout: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    """(blocks per ROI, constexprs and options) of a backward scatter of ``problem.argmax`` into
    gradients of `gradient_elements` in all, summed in `accumulate`, with the kernel's `layout`
    constants; (0, {}) when there is nothing to scatter."""
    num_rois, channels, pooled_height, pooled_width = problem.argmax.shape
    if num_rois == 0 or gradient_elements == 0 or problem.argmax.numel() == 0:
        return 0, {}
    element_size = torch.empty((), dtype=accumulate).element_size()
    l2_bytes = device_sizes(device_index)[1]
    block = plan.backward_block(gradient_elements * element_size, l2_bytes, tuning)
    meta = {
        "ROIS_F64": problem.rois.dtype == torch.float64,
        "ACC_F64": accumulate == torch.float64,
        "BLOCK": block,
        **layout,
        "num_warps": tuning.backward_warps,
        "enable_fp_fusion": False,
    }
    return -(-(channels * pooled_height * pooled_width) // block), meta


def dtype_flags(input_dtype: torch.dtype, rois_dtype: torch.dtype) -> dict[str, Any]:
    """The forward kernels' dtype constants."""
    return {
        "GEOM_HALF": rois_dtype == torch.float16,
        "GEOM_F64": rois_dtype == torch.float64,
        "ACC_F64": input_dtype == torch.float64,
    }


def forward_options(needs_argmax: bool, reports: bool, warps: int) -> dict[str, Any]:
    """The forward kernels' output flags and launch options."""
    return {
        "NEEDS_ARGMAX": needs_argmax,
        "REPORT_BAD": reports,
        "num_warps": warps,
        "enable_fp_fusion": False,
    }


def unit_sizes(
    channels: int, bins: int, input_bytes: int, device_index: int, tuning: Tuning
) -> tuple[dict[str, Any], int, UnitSizes, int]:
    """(constexprs, blocks per ROI, `UnitSizes`, warps) of the unit kernel for inputs of
    `input_bytes` bytes in all on this device."""
    multiprocessors, l2_bytes = device_sizes(device_index)
    target = plan.unit_target(input_bytes, l2_bytes, tuning)
    per = plan.unit_channels_most(channels, bins, target, tuning)
    unit = UnitSizes(
        (channels, bins, multiprocessors, target), per, tuning.min_programs_per_sm * multiprocessors
    )
    sizes = {"LANES": tuning.unit_lanes, "CHANNELS": tuning.unit_channels}
    return sizes, -(-channels // per), unit, tuning.unit_warps


def channels_last_sizes(
    inputs: list[torch.Tensor], bins: int, tuning: Tuning
) -> tuple[dict[str, Any], int, int]:
    """(constexprs, blocks per ROI, warps) of the channels_last kernel reading all of `inputs`
    (one dtype and channel count): 16-byte vectors only when every input allows them."""
    channels = inputs[0].shape[1]
    block_c, block_b = plan.channels_last_tile(channels, bins, inputs[0].element_size(), tuning)
    sizes = {
        "BLOCK_C": block_c,
        "BLOCK_B": block_b,
        "VEC": min(aligned_channel_vector(x, VECTOR_BYTES) for x in inputs),
        "EVEN_C": channels % block_c == 0,
        "C_UNIT": all(x.stride(1) == 1 for x in inputs),
    }
    return sizes, -(-channels // block_c) * -(-bins // block_b), tuning.channels_last_warps


def launch_forward(found: ForwardPlan, num_rois: int, pointers: tuple, tuning: Tuning) -> None:
    """Launch a forward plan's kernel for `num_rois` ROIs with these pointer arguments: the
    unit kernel with fewer channels per program when there are too few ROIs to fill the
    device (`plan.unit_channels_per_program`)."""
    if found.unit is None:
        launch_kernel(found, num_rois, found.blocks, pointers, ())
    elif num_rois * found.blocks >= found.unit.enough_programs:  # the common case
        launch_kernel(found, num_rois, found.blocks, pointers, (found.unit.channels_per_program,))
    else:  # few ROIs: fewer channels per program, for more programs
        channels, bins, multiprocessors, target = found.unit.sizes
        per = plan.unit_channels_per_program(
            num_rois, channels, bins, multiprocessors, target, tuning
        )
        launch_kernel(found, num_rois, -(-channels // per), pointers, (per,))


def launch_kernel(
    found: ForwardPlan | BackwardPlan,
    num_rois: int,
    blocks: int,
    pointers: tuple,
    tail: tuple,
    extra_key: tuple = (),
) -> None:
    """Launch `found`'s kernel on grid (num_rois, blocks) with arguments (pointers, the plan's
    scalars, the first block, tail), in launches of at most MAX_GRID_Y blocks on axis 1, on the
    plan's device. The cache key is the plan with what the plan leaves open (`tail`, the first
    block, `extra_key`)."""
    index = found.device_index
    if index >= 0 and torch.cuda.current_device() != index:
        with torch.cuda.device(index):
            launch_kernel(found, num_rois, blocks, pointers, tail, extra_key)
        return
    kernel = found.kernel
    for start in range(0, blocks, MAX_GRID_Y):
        grid = (num_rois, min(MAX_GRID_Y, blocks - start))
        args = (*pointers, *found.scalars, start, *tail)
        launch_cache.launch(kernel, grid, args, found.meta, (found, start, tail, extra_key))


def _fill_empty(output: torch.Tensor, argmax: torch.Tensor | None) -> None:
    """Outputs of an input with no pixel: every bin is empty."""
    output.zero_()
    if argmax is not None:
        argmax.fill_(-1)


def _record_only(rois: torch.Tensor, log: Any, num_images: int, device_index: int) -> None:
    """Record the invalid rows of `rois` in the bad-ROI log where no forward kernel runs."""
    if device_index >= 0 and torch.cuda.current_device() != device_index:
        with torch.cuda.device(device_index):
            _record_only(rois, log, num_images, device_index)
        return
    record_bad_rois[(rois.shape[0],)](
        rois, log, num_images, *rois.stride(), GEOM_F64=rois.dtype == torch.float64
    )
