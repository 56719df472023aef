"""Compiling the kernels with CuPy (NVRTC) and launching them on torch tensors.

The only module of roi_ops_cupy that imports CuPy. Kernels are compiled once per device and
NVRTC module (`kernels.module_names`), cached here for the process and by CuPy on disk. Tensors
are passed as raw device pointers with their strides (no copies, no DLPack round trip), on the
tensor's device and torch's current stream, through cuLaunchKernel (CuPy's driver binding).

A `Launcher` plans with one `CupyTuning` and caches a packed launch per problem key (shapes,
strides, dtypes, output size, which optional buffers are given): a call then only writes its
tensors' pointers into the packed arguments and launches. Multi-level calls work the same way,
with one fused launch per direction for every pyramid level (after the levels' copies where an
NCHW pyramid is staged channels_last). The backend uses `DEFAULT_LAUNCHER`.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable

import cupy
import numpy as np
import torch
from cupy_backends.cuda.api import driver
from roi_ops.backend import (
    MultiScaleRoIPoolBackwardProblem,
    MultiScaleRoIPoolProblem,
    RoIPoolBackwardProblem,
    RoIPoolProblem,
    accumulate_dtype,
)
from roi_ops.device_info import CudaSizes, cuda_sizes

from . import kernels, planning
from .tuning import DEFAULT_TUNING, CupyTuning

_lock = threading.Lock()
_kernels: dict[tuple[int, str], cupy.RawKernel] = {}  # (device, name) -> compiled kernel
# cuFuncSetAttribute's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_MAX_DYNAMIC_SHARED_ATTRIBUTE = 8
# CUfunction handle -> the dynamic shared memory it is opted in to (bytes).
_opted_in_shared: dict[int, int] = {}
# The tensors a forward and a backward launch take, by argument name, in the order the launcher
# passes them on every call.
FORWARD_TENSORS = ("input", "rois", "output", "argmax", "bad_roi_log")
BACKWARD_TENSORS = ("grad_output", "argmax", "rois", "grad_input")
PLANES_GROUPED_TENSORS = ("grad_output", "argmax", "groups", "grad_input")
COPY_TENSORS = ("input", "output")  # the staged forward's channels_last copy
# A forward whose cvec kernel reads the tables of maxima, the count of the reads they save and
# the tables' decision and build.
FORWARD_TABLES_TENSORS = (*FORWARD_TENSORS, "tables", "table_decision")
TABLE_SAVINGS_TENSORS = ("rois", "decision")
MAX_TABLES_TENSORS = ("input", "decision", "tables")
_CHANNELS_LAST = torch.channels_last
# The same for the multi-level launches of L levels: then each level's map (gradient).
FORWARD_LEVELS_TENSORS = ("rois", "levels", "output", "argmax", "bad_roi_log")
BACKWARD_LEVELS_TENSORS = ("grad_output", "argmax", "rois", "levels")  # the atomic kernel's
PLANES_LEVELS_TENSORS = ("grad_output", "argmax", "groups")  # the planes kernel's
GROUP_ROIS_TENSORS = ("rois", "levels", "groups")  # the grouping before the planes kernel
_MAX_CACHED_PLANS = 256


def compiled_kernel(device: int, name: str) -> cupy.RawKernel:
    """The compiled kernel `name` on `device`, compiling its whole NVRTC module on first use.

    Raises:
        RuntimeError: NVRTC failed (the message holds its log).
    """
    kernel = _kernels.get((device, name))
    if kernel is not None:
        return kernel
    names = kernels.module_names(name)
    with _lock:
        if (device, name) not in _kernels:
            with cupy.cuda.Device(device):
                module = cupy.RawModule(
                    code=kernels.source(), options=kernels.COMPILE_OPTIONS, name_expressions=names
                )
                try:
                    compiled = {n: module.get_function(n) for n in names}
                    for function in compiled.values():
                        function.compile()
                except cupy.cuda.compiler.CompileException as error:
                    raise RuntimeError(
                        f"roi_ops cupy backend: NVRTC failed to compile {', '.join(names)}:\n"
                        f"{error}"
                    ) from error
            for module_name, function in compiled.items():
                _kernels[(device, module_name)] = function
        return _kernels[(device, name)]


# torch's own cheap accessor (what torch.compile's generated code calls); public API otherwise.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(device: int) -> int:
    """The raw handle of torch's current stream on `device`."""
    if _raw_stream is not None:
        return _raw_stream(device)
    return torch.cuda.current_stream(device).cuda_stream


class PackedLaunch:
    """A launch ready for cuLaunchKernel: the kernel's handle and its arguments as 8-byte words.

    CuPy's RawKernel call converts every argument on every launch; here they are packed once,
    and each call only rewrites the words of its tensor arguments, found by name.
    """

    __slots__ = (
        "name",
        "function",
        "grid",
        "block",
        "shared_mem",
        "words",
        "pointers",
        "params",
        "positions",
        "lock",
    )

    def __init__(self, device: int, launch: kernels.Launch, tensor_names: tuple[str, ...]):
        kernel = compiled_kernel(device, launch.name)
        with cupy.cuda.Device(device):
            self.function = kernel.kernel.ptr  # the CUfunction loaded on `device`
            # The opt-in (per function) counts dynamic memory only, but the 48 KiB a block
            # gets without it also covers the kernel's static arrays: always opt in. The
            # attribute belongs to the function, which every cached plan of it shares: only
            # ever raise it, or a plan made later with less would break the earlier ones.
            opted_in = _opted_in_shared.get(self.function, 0)
            if launch.shared_mem > opted_in:
                driver.funcSetAttribute(
                    self.function, _MAX_DYNAMIC_SHARED_ATTRIBUTE, launch.shared_mem
                )
                _opted_in_shared[self.function] = launch.shared_mem
        self.name = launch.name
        self.grid = launch.grid
        self.block = launch.block
        self.shared_mem = launch.shared_mem
        self.words = launch.words()
        # cuLaunchKernel's kernelParams: the address of each argument (of a struct's first word).
        offsets = np.array(launch.param_offsets(), dtype=np.uint64)
        self.pointers = self.words.ctypes.data + np.uint64(8) * offsets
        self.params = self.pointers.ctypes.data  # both arrays live as long as this object
        self.positions = tuple(launch.position(name) for name in tensor_names)
        self.lock = threading.Lock()  # held from rewriting `words` until the launch is queued

    def launch(self, device: int, tensors: tuple[torch.Tensor | None, ...]) -> None:
        """Queue the kernel on torch's current stream of `device` with `tensors` (in the order
        of the names given at construction; None passes a null pointer)."""
        with self.lock:
            words = self.words
            for position, tensor in zip(self.positions, tensors):  # noqa: B905 (hot path)
                words[position] = 0 if tensor is None else tensor.data_ptr()
            stream = _current_stream(device)
            try:
                if cupy.cuda.runtime.getDevice() == device:
                    self._launch(stream)
                else:
                    with cupy.cuda.Device(device):
                        self._launch(stream)
            except cupy.cuda.driver.CUDADriverError as error:
                raise RuntimeError(
                    f"roi_ops cupy backend: launching {self.name} with grid {self.grid}, block "
                    f"{self.block} and {self.shared_mem} B shared memory failed: {error}"
                ) from error

    def _launch(self, stream: int) -> None:
        driver.launchKernel(
            self.function, *self.grid, *self.block, self.shared_mem, stream,
            self.params, 0,
        )  # fmt: skip


def run(device: int, launch: kernels.Launch) -> None:
    """Launch `launch` on `device` and torch's current stream as planned (its own pointers)."""
    PackedLaunch(device, launch, ()).launch(device, ())


def _forward_key(
    device: int,
    inputs: tuple,
    scales: float | tuple[float, ...],
    problem: RoIPoolProblem | MultiScaleRoIPoolProblem,
    argmax: torch.Tensor | None,
) -> tuple:
    """The plan key of a forward call: the device, what its plan reads of its inputs (`inputs`)
    and their `scales`, then what every forward plan depends on (the ROIs' layout, the output
    size, which optional buffers are given)."""
    rois = problem.rois
    return (
        device, inputs, scales, rois.shape, rois.stride(), rois.dtype, problem.pooled_height,
        problem.pooled_width, argmax is None, problem.bad_roi_log is None,
    )  # fmt: skip


def _backward_operands(
    problem: RoIPoolBackwardProblem | MultiScaleRoIPoolBackwardProblem,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_output, argmax) as the backward kernels read them: the gradient in
    ``problem.input_dtype``, the argmax contiguous (each copied only when it is not already)."""
    grad_output, argmax = problem.grad_output, problem.argmax
    if grad_output.dtype != problem.input_dtype:
        grad_output = grad_output.to(problem.input_dtype)
    if not argmax.is_contiguous():
        argmax = argmax.contiguous()
    return grad_output, argmax


def _backward_key(
    device: int,
    grad_output: torch.Tensor,
    problem: RoIPoolBackwardProblem | MultiScaleRoIPoolBackwardProblem,
    *rest: object,
) -> tuple:
    """The plan key of a backward call: what every backward plan depends on, then `rest`."""
    rois = problem.rois
    return (
        device, grad_output.shape, grad_output.stride(), problem.input_dtype, rois.stride(),
        rois.dtype, *rest,
    )  # fmt: skip


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of `shape` and `dtype`."""
    return math.prod(shape) * dtype.itemsize


def _groups_stand_in(rois: torch.Tensor, num_levels: int, num_images: int) -> torch.Tensor:
    """The grouping's buffer (`planning.group_rois_size`) without memory: plans read none."""
    size = planning.group_rois_size(rois.shape[0], num_levels, num_images)
    return torch.empty(size, dtype=torch.int32, device="meta")


class _Grouping:
    """The launch that lists each (level, image)'s ROIs (`planning.plan_group_rois`) before a
    planes kernel that reads the lists, planned once on the stand-in buffer that the planes
    kernel's plan took; `run` allocates each call's buffer and queues the launch."""

    __slots__ = ("packed", "size")

    def __init__(self, device: int, rois, levels, num_levels: int, num_images: int, stand_in):
        self.size = stand_in.numel()
        plan = planning.plan_group_rois(rois, levels, num_levels, num_images, stand_in)
        self.packed = PackedLaunch(device, plan, GROUP_ROIS_TENSORS)

    def run(self, device: int, rois, levels, where: torch.device) -> torch.Tensor:
        """A new buffer, filled by the launch queued on the current stream."""
        groups = torch.empty(self.size, dtype=torch.int32, device=where)
        self.packed.launch(device, (rois, levels, groups))
        return groups


@functools.cache
def _has_max_nan(device: int) -> bool:
    """Whether `device` has max.NaN (sm_80 and later), which the tables of maxima need."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


class _Address:
    """A device address where the launches take a tensor (they read only `data_ptr`)."""

    __slots__ = ("address",)

    def __init__(self, address: int):
        self.address = address

    def data_ptr(self) -> int:
        return self.address


class _Tables:
    """The tables of maxima of a forward key (`planning.uses_max_tables`): the count's and the
    build's launches, planned once on stand-ins; `run` allocates each call's buffer (the
    decision's bytes, then the tables: `planning.table_buffer_elements`) and queues both."""

    __slots__ = ("count", "build", "elements")

    def __init__(self, device: int, problem: RoIPoolProblem, sizes: CudaSizes, tuning: CupyTuning):
        x = problem.input
        self.elements = planning.table_buffer_elements(x)
        decision = torch.empty(planning.TABLE_HEAD_BYTES // 4, dtype=torch.int32, device="meta")
        tables = torch.empty(self.elements, dtype=x.dtype, device="meta")
        count = planning.plan_table_savings(problem, decision)
        build = planning.plan_max_tables(problem, decision, tables, sizes, tuning)
        self.count = PackedLaunch(device, count, TABLE_SAVINGS_TENSORS)
        self.build = PackedLaunch(device, build, MAX_TABLES_TENSORS)

    def run(self, device: int, x: torch.Tensor, rois: torch.Tensor) -> tuple:
        """(the buffer, the tables, the decision) of map `x`, the latter two as the forward
        launch takes them, their launches queued on the current stream. Hold the buffer until
        the forward is queued: torch may then hand its memory to later work on this stream
        only, which runs after the forward."""
        buffer = torch.empty(self.elements, dtype=x.dtype, device=x.device)
        decision = _Address(buffer.data_ptr())
        tables = _Address(decision.address + planning.TABLE_HEAD_BYTES)
        self.count.launch(device, (rois, decision))
        self.build.launch(device, (x, decision, tables))
        return buffer, tables, decision


class _BackwardPlan:
    """What a backward call with a given key does: the packed launch (None: nothing to add), the
    gradient's dtype and layout as the kernel writes it, whether it is zero-filled first, and
    for the grouped planes kernel the `_Grouping` queued before it (else None)."""

    __slots__ = ("packed", "written", "memory_format", "zero_fill", "grouping")

    def __init__(self, packed, written, memory_format, zero_fill, grouping=None):
        self.packed = packed
        self.written = written
        self.memory_format = memory_format
        self.zero_fill = zero_fill
        self.grouping = grouping


class _BackwardLevelsPlan:
    """What a multi-level backward call with a given key does: the packed launch (None: nothing
    to add), the gradients' dtype as the kernel writes them, their layouts, whether they are
    zero-filled first, and for the planes kernel the `_Grouping` queued before it (else
    None)."""

    __slots__ = ("packed", "written", "memory_formats", "zero_fill", "grouping")

    def __init__(self, packed, written, memory_formats, zero_fill, grouping=None):
        self.packed = packed
        self.written = written
        self.memory_formats = memory_formats
        self.zero_fill = zero_fill
        self.grouping = grouping


class Launcher:
    """Plans with one `CupyTuning`, caches the packed plans per problem key, and launches.

    Not bound to a device: keys include the device index.
    """

    def __init__(self, tuning: CupyTuning = DEFAULT_TUNING):
        self.tuning = tuning
        # (forward launch, staged, copy launch, tables)
        self._forward: dict[tuple, tuple] = {}
        self._backward: dict[tuple, _BackwardPlan] = {}
        # (forward launch, each level's copy launch where the pyramid is staged, else empty)
        self._forward_levels: dict[tuple, tuple] = {}
        self._backward_levels: dict[tuple, _BackwardLevelsPlan] = {}

    def forward(
        self, problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Fill `output` and, unless None, `argmax`, and record invalid ROIs in
        ``problem.bad_roi_log`` unless it is None (see `roi_ops.Backend.forward`)."""
        x, rois = problem.input, problem.rois
        log = problem.bad_roi_log
        device = x.get_device()
        # the cvec kernel needs an aligned input
        inputs = (x.shape, x.stride(), x.dtype, x.data_ptr() % planning.CVEC_BYTES)
        key = _forward_key(device, inputs, problem.spatial_scale, problem, argmax)
        try:
            packed, staged, copy, tables = self._forward[key]
        except KeyError:
            make = lambda: self._plan_forward(problem, output, argmax, device)  # noqa: E731
            packed, staged, copy, tables = self._cache(self._forward, key, make)
        if packed is not None:
            if staged:
                x = self._stage(x, copy, device)
            if tables is None:
                packed.launch(device, (x, rois, output, argmax, log))
            else:
                # The buffer is held until the forward is queued, so that no allocation in
                # between is handed its memory.
                buffer, table, decision = tables.run(device, x, rois)
                packed.launch(device, (x, rois, output, argmax, log, table, decision))
                del buffer

    @staticmethod
    def _stage(x: torch.Tensor, copy: PackedLaunch | None, device: int) -> torch.Tensor:
        """A dense channels_last copy of `x`, written by the copy kernel (`copy`), or by torch
        where `copy` is None (an empty input)."""
        if copy is None:
            return x.contiguous(memory_format=_CHANNELS_LAST)
        staged = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_CHANNELS_LAST)
        copy.launch(device, (x, staged))
        return staged

    @staticmethod
    def _plan_stage(x: torch.Tensor, device: int) -> tuple:
        """(a dense channels_last stand-in of `x` on the meta device, to plan the forward on,
        and the packed launch of the copy kernel that makes the copy, or None for an empty `x`,
        which torch copies: `_stage`)."""
        stand_in = torch.empty(x.shape, dtype=x.dtype, device="meta")
        stand_in = stand_in.contiguous(memory_format=_CHANNELS_LAST)
        copy_plan = planning.plan_copy_channels_last(x, stand_in)
        copy = None if copy_plan is None else PackedLaunch(device, copy_plan, COPY_TENSORS)
        return stand_in, copy

    def _plan_forward(self, problem, output, argmax, device) -> tuple:
        """(the packed launch of a forward key, whether it reads a channels_last copy of the
        input (`planning.stages_channels_last`; planned on a stand-in with its strides), the
        packed launch of the copy kernel that makes it, or None (unstaged, or an empty input,
        which torch copies), and the `_Tables` queued before the forward launch, or None
        (`planning.uses_max_tables`))."""
        sizes = cuda_sizes(device)
        x = problem.input
        staged = planning.stages_channels_last(problem, sizes, self.tuning)
        copy = None
        if staged:
            stand_in, copy = self._plan_stage(x, device)
            problem = RoIPoolProblem(
                stand_in, problem.rois, problem.pooled_height, problem.pooled_width,
                problem.spatial_scale, problem.needs_argmax, problem.bad_roi_log,
            )  # fmt: skip
        tables = None
        if planning.uses_max_tables(
            problem, argmax is not None, sizes, _has_max_nan(device), self.tuning
        ):
            tables = _Tables(device, problem, sizes, self.tuning)
        plan = planning.plan_forward(problem, output, argmax, sizes, self.tuning)
        if plan is None:
            return None, staged, copy, None
        if tables is None:
            return PackedLaunch(device, plan, FORWARD_TENSORS), staged, copy, None
        return PackedLaunch(device, plan, FORWARD_TABLES_TENSORS), staged, copy, tables

    def backward(self, problem: RoIPoolBackwardProblem) -> torch.Tensor:
        """grad_input by the planes or the atomic kernel (not run-to-run deterministic in its last
        bits; see `planning.backward_kernel` for the choice).

        Returns:
            (N, C, H, W) tensor of ``problem.input_dtype``, dense in ``problem.memory_format``
            or, where `planning.channels_last_gradient` says that is faster, contiguous when
            channels_last was asked; float16/bfloat16 are accumulated in float32 and rounded
            once.
        """
        input_dtype, rois = problem.input_dtype, problem.rois
        grad_output, argmax = _backward_operands(problem)
        device = grad_output.get_device()
        key = _backward_key(
            device, grad_output, problem, problem.input_shape, problem.memory_format
        )
        try:
            plan = self._backward[key]
        except KeyError:
            make = lambda: self._plan_backward(problem, grad_output, argmax, device)  # noqa: E731
            plan = self._cache(self._backward, key, make)
        if plan.memory_format == torch.contiguous_format:  # new_empty: less argument parsing
            grad_input = grad_output.new_empty(problem.input_shape, dtype=plan.written)
        else:
            grad_input = torch.empty(
                problem.input_shape,
                dtype=plan.written,
                device=grad_output.device,
                memory_format=plan.memory_format,
            )
        if plan.zero_fill:
            grad_input.zero_()
        if plan.grouping is not None:
            groups = plan.grouping.run(device, rois, None, grad_output.device)
            plan.packed.launch(device, (grad_output, argmax, groups, grad_input))
        elif plan.packed is not None:
            plan.packed.launch(device, (grad_output, argmax, rois, grad_input))
        return grad_input if plan.written == input_dtype else grad_input.to(input_dtype)

    def _plan_backward(self, problem, grad_output, argmax, device) -> _BackwardPlan:
        sizes = cuda_sizes(device)
        input_shape, input_dtype = problem.input_shape, problem.input_dtype
        kernel = planning.backward_kernel(
            input_shape, input_dtype, tuple(argmax.shape), sizes, self.tuning
        )
        planes = kernel != kernels.BACKWARD_ATOMIC  # writes every element, rounded
        grouped = kernel == kernels.BACKWARD_PLANES_GROUPED
        written = input_dtype if planes else accumulate_dtype(input_dtype)
        memory_format = problem.memory_format
        if memory_format == torch.channels_last:
            size = _nbytes(input_shape, written)
            if not planning.channels_last_gradient(size, sizes.l2_bytes, self.tuning):
                memory_format = torch.contiguous_format
        # A stand-in with the gradient's strides: plans read strides, never memory.
        grad_input = torch.empty(
            input_shape, dtype=written, device="meta", memory_format=memory_format
        )
        rois, num_images = problem.rois, input_shape[0]
        groups = _groups_stand_in(rois, 1, num_images) if grouped else None
        launch = planning.plan_backward(
            grad_output, argmax, rois, grad_input, kernel, sizes, self.tuning, groups
        )
        if launch is None:
            return _BackwardPlan(None, written, memory_format, not planes)
        names = PLANES_GROUPED_TENSORS if grouped else BACKWARD_TENSORS
        packed = PackedLaunch(device, launch, names)
        grouping = _Grouping(device, rois, None, 1, num_images, groups) if grouped else None
        return _BackwardPlan(packed, written, memory_format, not planes, grouping)

    def forward_multi_scale(
        self, problem: MultiScaleRoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Fill `output` and, unless None, `argmax` for every ROI of every level in one launch
        (after a copy of each level where the pyramid is staged, `planning.stages_pyramid`),
        and record invalid ROIs in ``problem.bad_roi_log`` unless it is None (see
        `roi_ops.Backend.forward_multi_scale`). Reads no ROI's level on the host."""
        features, rois, levels = problem.features, problem.rois, problem.levels
        log = problem.bad_roi_log
        first = features[0]
        device = first.get_device()
        inputs = (
            first.dtype,
            # the cvec kernels need aligned inputs
            tuple((x.shape, x.stride(), x.data_ptr() % planning.CVEC_BYTES) for x in features),
            levels.stride(),
        )
        key = _forward_key(device, inputs, problem.spatial_scales, problem, argmax)
        try:
            packed, copies = self._forward_levels[key]
        except KeyError:
            make = lambda: self._plan_forward_levels(problem, output, argmax, device)  # noqa: E731
            packed, copies = self._cache(self._forward_levels, key, make)
        if packed is not None:
            if copies:
                features = tuple(
                    self._stage(x, copy, device)
                    for x, copy in zip(features, copies)  # noqa: B905
                )
            packed.launch(device, (rois, levels, output, argmax, log, *features))

    def _plan_forward_levels(self, problem, output, argmax, device) -> tuple:
        """(the packed fused launch of a forward key, or None when there is nothing to do, and
        each level's packed copy launch where the pyramid is staged (`planning.stages_pyramid`),
        else empty); planned on channels_last stand-ins of the staged levels."""
        sizes = cuda_sizes(device)
        copies = ()
        if planning.stages_pyramid(problem, sizes, self.tuning):
            staged = [self._plan_stage(x, device) for x in problem.features]
            stand_ins = [stand_in for stand_in, _ in staged]
            copies = tuple(copy for _, copy in staged)  # none empty: each is the copy kernel's
            problem = MultiScaleRoIPoolProblem(
                stand_ins, problem.rois, problem.levels, problem.pooled_height,
                problem.pooled_width, problem.spatial_scales, problem.needs_argmax,
                problem.bad_roi_log,
            )  # fmt: skip
        plan = planning.plan_forward_levels(problem, output, argmax, sizes, self.tuning)
        if plan is None:
            return None, ()
        names = FORWARD_LEVELS_TENSORS + planning.level_names("input", problem.num_levels)
        return PackedLaunch(device, plan, names), copies

    def backward_multi_scale(self, problem: MultiScaleRoIPoolBackwardProblem) -> list[torch.Tensor]:
        """The L gradients of a fused forward, by one launch: of the planes kernel that sums each
        level's gradient planes in shared memory and writes them whole, or (where its planes do
        not fit) of the atomic kernel that adds each ROI's gradients into its level's
        zero-filled gradient; neither is run-to-run deterministic in its last bits.

        Returns:
            One (N, C, H_l, W_l) tensor of ``problem.input_dtype`` per level, dense in its
            ``problem.memory_formats`` entry (channels_last ones contiguous instead when all
            gradients together do not fit in L2, see `planning.channels_last_gradient`);
            float16/bfloat16 summed in float32 and rounded once.
        """
        input_dtype, rois, levels = problem.input_dtype, problem.rois, problem.levels
        grad_output, argmax = _backward_operands(problem)
        device = grad_output.get_device()
        key = _backward_key(
            device, grad_output, problem, levels.stride(), problem.input_shapes,
            problem.memory_formats,
        )  # fmt: skip
        try:
            plan = self._backward_levels[key]
        except KeyError:
            make = lambda: self._plan_backward_levels(problem, grad_output, argmax, device)  # noqa: E731
            plan = self._cache(self._backward_levels, key, make)
        written, where = plan.written, grad_output.device
        grads = [
            torch.empty(shape, dtype=written, device=where, memory_format=fmt)
            for shape, fmt in zip(problem.input_shapes, plan.memory_formats)  # noqa: B905
        ]
        if plan.zero_fill:
            for grad in grads:
                grad.zero_()
        if plan.grouping is not None:
            groups = plan.grouping.run(device, rois, levels, where)
            plan.packed.launch(device, (grad_output, argmax, groups, *grads))
        elif plan.packed is not None:
            plan.packed.launch(device, (grad_output, argmax, rois, levels, *grads))
        if written != input_dtype:
            return [grad.to(input_dtype) for grad in grads]
        return grads

    def _plan_backward_levels(self, problem, grad_output, argmax, device) -> _BackwardLevelsPlan:
        sizes = cuda_sizes(device)
        input_dtype = problem.input_dtype
        kernel = planning.backward_levels_kernel(
            problem.input_shapes, input_dtype, tuple(argmax.shape), sizes, self.tuning
        )
        planes = kernel == kernels.BACKWARD_PLANES_LEVELS  # writes every element, rounded
        written = input_dtype if planes else accumulate_dtype(input_dtype)
        total = sum(_nbytes(shape, written) for shape in problem.input_shapes)
        channels_last = planning.channels_last_gradient(total, sizes.l2_bytes, self.tuning)
        formats = tuple(
            fmt if channels_last else torch.contiguous_format for fmt in problem.memory_formats
        )
        # Stand-ins with the gradients' strides: plans read strides, never memory.
        grads = [
            torch.empty(shape, dtype=written, device="meta", memory_format=fmt)
            for shape, fmt in zip(problem.input_shapes, formats, strict=True)
        ]
        rois, levels, num_images = problem.rois, problem.levels, problem.input_shapes[0][0]
        groups = _groups_stand_in(rois, len(grads), num_images) if planes else None
        launch = planning.plan_backward_levels(
            grad_output, argmax, rois, levels, grads, sizes, self.tuning, kernel, groups
        )
        if launch is None:
            return _BackwardLevelsPlan(None, written, formats, not planes)
        names = PLANES_LEVELS_TENSORS if planes else BACKWARD_LEVELS_TENSORS
        names += planning.level_names("grad_input", len(grads))
        packed = PackedLaunch(device, launch, names)
        grouping = None
        if planes:
            grouping = _Grouping(device, rois, levels, len(grads), num_images, groups)
        return _BackwardLevelsPlan(packed, written, formats, not planes, grouping)

    @staticmethod
    def _cache(cache: dict, key: tuple, make: Callable):
        value = make()
        if len(cache) >= _MAX_CACHED_PLANS:
            cache.clear()
        cache[key] = value
        return value


DEFAULT_LAUNCHER = Launcher()
