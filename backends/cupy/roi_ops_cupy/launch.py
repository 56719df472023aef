"""Compiling roi_pool.cu with CuPy (NVRTC) and launching it on torch tensors.

The only module of roi_ops_cupy that imports CuPy. Kernels are compiled once per device and
dtype pair (one RawModule holds a pair's four forward instantiations; the backward has one module
per input dtype), cached here for the process and by CuPy on disk. Tensors are passed as raw
device pointers with their strides (no copies, no DLPack round trip), on the input's device and
torch's current stream, through cuLaunchKernel (CuPy's driver binding) with the arguments packed
once per cached plan.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable

import cupy
import numpy as np
import torch
from cupy_backends.cuda.api import driver
from roi_ops.backend import RoIPoolProblem

from . import kernels

_lock = threading.Lock()
_kernels: dict[tuple[int, str, tuple[str, ...]], cupy.RawKernel] = {}
_sizes: dict[int, tuple[int, int, int]] = {}
# cuFuncSetAttribute's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_MAX_DYNAMIC_SHARED_ATTRIBUTE = 8


def _kernel(device: int, name: str, module_names: tuple[str, ...]) -> cupy.RawKernel:
    """The compiled kernel `name` on `device`, compiling its whole module on first use."""
    options = kernels.compile_options()
    kernel = _kernels.get((device, name, options))
    if kernel is not None:
        return kernel
    with _lock:
        if (device, name, options) not in _kernels:
            with cupy.cuda.Device(device):
                module = cupy.RawModule(
                    code=kernels.source(),
                    options=options,
                    name_expressions=module_names,
                )
                try:
                    compiled = {n: module.get_function(n) for n in module_names}
                    for function in compiled.values():
                        function.compile()
                except cupy.cuda.compiler.CompileException as error:
                    raise RuntimeError(
                        f"roi_ops cupy backend: NVRTC failed to compile {kernels.SOURCE_NAME} "
                        f"for {', '.join(module_names)}:\n{error}"
                    ) from error
            for module_name, function in compiled.items():
                _kernels[(device, module_name, options)] = function
        return _kernels[(device, name, options)]


def _device_sizes(device: int) -> tuple[int, int, int]:
    """(SM count, L2 bytes, shared memory a block may opt in to) of `device`, cached."""
    sizes = _sizes.get(device)
    if sizes is None:
        properties = torch.cuda.get_device_properties(device)
        shared = cupy.cuda.runtime.deviceGetAttribute(
            cupy.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device
        )
        sizes = (
            properties.multi_processor_count,
            getattr(properties, "L2_cache_size", 0),
            shared,
        )
        _sizes[device] = sizes
    return sizes


class _Packed:
    """A launch ready for cuLaunchKernel: the kernel's handle and its arguments as 8-byte words.

    CuPy's RawKernel call converts every argument on every launch (about 30 us for the forward's
    18); here they are packed once, and a cached plan only rewrites its pointer words.
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
        "lock",
    )

    def __init__(self, device: int, launch: kernels.Launch, module_names: tuple[str, ...]):
        kernel = _kernel(device, launch.name, module_names)
        with cupy.cuda.Device(device):
            self.function = kernel.kernel.ptr  # the CUfunction loaded on `device`
            # The opt-in (per function) counts dynamic memory only, but the 48 KiB a block
            # gets without it also covers the kernel's static arrays: always opt in.
            if launch.shared_mem > 0:
                driver.funcSetAttribute(
                    self.function, _MAX_DYNAMIC_SHARED_ATTRIBUTE, launch.shared_mem
                )
        self.name = launch.name
        self.grid = launch.grid
        self.block = launch.block
        self.shared_mem = launch.shared_mem
        self.words = np.array([np.asarray(a).view(np.uint64) for a in launch.args], np.uint64)
        # cuLaunchKernel's kernelParams: the address of each argument.
        self.pointers = self.words.ctypes.data + 8 * np.arange(len(self.words), dtype=np.uint64)
        self.params = self.pointers.ctypes.data  # both arrays live as long as this object
        self.lock = threading.Lock()  # callers that rewrite `words` hold it until the launch

    def launch(self, device: int) -> None:
        """Queue the kernel on torch's current stream of `device` (the caller holds `lock`)."""
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


# torch's own cheap accessor (what torch.compile's generated code calls); public API otherwise.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(device: int) -> int:
    """The raw handle of torch's current stream on `device`."""
    if _raw_stream is not None:
        return _raw_stream(device)
    return torch.cuda.current_stream(device).cuda_stream


def _run(device: int, launch: kernels.Launch, module_names: tuple[str, ...]) -> None:
    """Launch `launch` on `device` and torch's current stream (packing its arguments)."""
    _Packed(device, launch, module_names).launch(device)


def _device_index(tensor: torch.Tensor) -> int:
    index = tensor.device.index
    return torch.cuda.current_device() if index is None else index


# Forward plans depend on shapes, strides, dtypes and settings, not on the data pointers: a plan
# is made and packed once per such key, and its four pointer words are rewritten on every call.
_POINTER_ARGS = (0, 9, 16, 17)  # input, rois, output, argmax in plan_forward's argument list
# grad_output, argmax, batch_index, grad_input in plan_backward's argument list (either kernel)
_BACKWARD_POINTER_ARGS = (0, 5, 6, 13)
_plans: dict[tuple, _Packed | None] = {}
_MAX_CACHED_PLANS = 256


def _settings() -> tuple:
    """Everything besides the tensors that a plan (or the module it runs) depends on."""
    return (
        kernels.TARGET_BLOCK_ELEMENTS,
        kernels.BACKWARD_BLOCK_ELEMENTS_STREAMED,
        kernels.PLANES_CHANNELS,
        os.environ.get("ROI_OPS_CUPY_BACKWARD"),
        os.environ.get("ROI_OPS_CUPY_PLANES_THREADS"),
        kernels.UNIT_BLOCK_ELEMENTS_CACHED,
        kernels.UNIT_BLOCK_ELEMENTS_STREAMED,
        kernels.MAX_CACHED_EDGES,
        kernels.CHAN_MIN_CHANNELS,
        os.environ.get("ROI_OPS_CUPY_KERNEL"),
        os.environ.get("ROI_OPS_CUPY_BLOCK_ELEMENTS"),
        os.environ.get(kernels.DEFINES_ENV),
    )


def _plan_key(problem: RoIPoolProblem, with_argmax: bool, device: int) -> tuple:
    x, rois = problem.input, problem.rois
    return (
        device,
        x.shape,
        x.stride(),
        x.dtype,
        x.data_ptr() % kernels.CVEC_BYTES,  # the cvec kernel needs an aligned input
        rois.shape,
        rois.stride(),
        rois.dtype,
        problem.pooled_height,
        problem.pooled_width,
        problem.spatial_scale,
        with_argmax,
        _settings(),
    )


def _launch_packed(
    device: int, key: tuple, make: Callable[[], _Packed | None], pointers: tuple, positions: tuple
) -> None:
    """Launch the cached packed plan for `key` (made by `make` on a miss) with `pointers`.

    `positions` are the plan's pointer arguments, rewritten with the tensors in `pointers` (None
    passes a null pointer).
    """
    try:
        packed = _plans[key]
    except KeyError:
        packed = make()
        if len(_plans) >= _MAX_CACHED_PLANS:
            _plans.clear()
        _plans[key] = packed
    if packed is None:
        return
    with packed.lock:
        words = packed.words
        for position, tensor in zip(positions, pointers, strict=True):
            words[position] = 0 if tensor is None else tensor.data_ptr()
        packed.launch(device)


def forward(problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None) -> None:
    """Fill `output` and, unless None, `argmax` (see `roi_ops.Backend.forward`)."""
    device = _device_index(problem.input)

    def make() -> _Packed | None:
        plan = kernels.plan_forward(problem, output, argmax, *_device_sizes(device)[:2])
        names = kernels.forward_names(problem.input.dtype, problem.rois.dtype)
        return None if plan is None else _Packed(device, plan, names)

    _launch_packed(
        device,
        _plan_key(problem, argmax is not None, device),
        make,
        (problem.input, problem.rois, output, argmax),
        _POINTER_ARGS,
    )


def backward(
    grad_output: torch.Tensor,
    argmax: torch.Tensor,
    batch_index: torch.Tensor,
    input_shape: tuple[int, int, int, int],
    input_dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """grad_input by the planes or the atomic kernel (not run-to-run deterministic in its last
    bits; see `kernels.backward_kernel` for the choice).

    Returns:
        (N, C, H, W) tensor of `input_dtype`, dense in `memory_format` (contiguous_format or
        channels_last) or, where `kernels.channels_last_gradient` says that is faster, contiguous
        when channels_last was asked; float16/bfloat16 are accumulated in float32 and rounded
        once.
    """
    device = _device_index(grad_output)
    multiprocessors, l2_bytes, shared_limit = _device_sizes(device)
    kernel = kernels.backward_kernel(
        input_shape, input_dtype, tuple(argmax.shape), multiprocessors, shared_limit
    )
    planes = kernel == kernels.BACKWARD_PLANES  # writes every element, rounded
    written = input_dtype if planes else kernels.accumulate_dtype(input_dtype)
    if memory_format == torch.channels_last:
        size = math.prod(input_shape) * written.itemsize
        if not kernels.channels_last_gradient(size, l2_bytes):
            memory_format = torch.contiguous_format
    grad_input = torch.empty(
        input_shape,
        dtype=written,
        device=grad_output.device,
        memory_format=memory_format,
    )
    if not planes:
        grad_input.zero_()
    grad_output = grad_output.to(input_dtype)
    argmax = argmax.contiguous()  # kept referenced until the launch is queued

    def make() -> _Packed | None:
        sizes = (multiprocessors, l2_bytes, kernel, shared_limit)
        launch = kernels.plan_backward(grad_output, argmax, batch_index, grad_input, *sizes)
        names = kernels.backward_names(input_dtype)
        return None if launch is None else _Packed(device, launch, names)

    key = (
        "backward",
        device,
        grad_output.shape,
        grad_output.stride(),
        grad_output.dtype,
        batch_index.stride(),
        tuple(input_shape),
        grad_input.stride(),
        kernel,
        _settings(),
    )
    pointers = (grad_output, argmax, batch_index, grad_input)
    _launch_packed(device, key, make, pointers, _BACKWARD_POINTER_ARGS)
    return grad_input if grad_input.dtype == input_dtype else grad_input.to(input_dtype)
