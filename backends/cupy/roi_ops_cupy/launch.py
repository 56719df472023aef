"""Compiling roi_pool.cu with CuPy (NVRTC) and launching it on torch tensors.

The only module of roi_ops_cupy that imports CuPy. Kernels are compiled once per device and
dtype pair (one RawModule holds a pair's four forward instantiations; the backward has one module
per input dtype), cached here for the process and by CuPy on disk. Tensors are passed as raw
device pointers with their strides (no copies, no DLPack round trip), on the input's device and
torch's current stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import cupy
import numpy as np
import torch
from roi_ops.backend import RoIPoolProblem

from . import kernels

_lock = threading.Lock()
_kernels: dict[tuple[int, str, tuple[str, ...]], cupy.RawKernel] = {}
_streams: dict[tuple[int, int], cupy.cuda.Stream] = {}
_sizes: dict[int, tuple[int, int]] = {}
_MAX_CACHED_STREAMS = 64


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


def _stream(device: int) -> cupy.cuda.Stream:
    """torch's current stream on `device`, as a CuPy stream (cached by handle)."""
    torch_stream = torch.cuda.current_stream(device)
    key = (device, torch_stream.cuda_stream)
    stream = _streams.get(key)
    if stream is None:
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(torch_stream, "__cuda_stream__"):
            stream = cupy.cuda.Stream.from_external(torch_stream)
        else:  # CuPy < 14 or torch without the CUDA stream protocol
            stream = cupy.cuda.ExternalStream(torch_stream.cuda_stream, device)
        if len(_streams) >= _MAX_CACHED_STREAMS:
            _streams.clear()
        _streams[key] = stream
    return stream


def _device_sizes(device: int) -> tuple[int, int]:
    """(SM count, L2 bytes) of `device`, cached."""
    sizes = _sizes.get(device)
    if sizes is None:
        properties = torch.cuda.get_device_properties(device)
        sizes = (properties.multi_processor_count, getattr(properties, "L2_cache_size", 0))
        _sizes[device] = sizes
    return sizes


def _run(device: int, launch: kernels.Launch, module_names: tuple[str, ...]) -> None:
    kernel = _kernel(device, launch.name, module_names)
    try:
        # Entering cupy.cuda.Device costs a get and two sets of the device; skip it when current.
        same = cupy.cuda.runtime.getDevice() == device
        with contextlib.nullcontext() if same else cupy.cuda.Device(device), _stream(device):
            kernel(launch.grid, launch.block, launch.args, shared_mem=launch.shared_mem)
    except cupy.cuda.driver.CUDADriverError as error:
        raise RuntimeError(
            f"roi_ops cupy backend: launching {launch.name} with grid {launch.grid}, block "
            f"{launch.block} and {launch.shared_mem} B shared memory failed: {error}"
        ) from error


def _device_index(tensor: torch.Tensor) -> int:
    index = tensor.device.index
    return torch.cuda.current_device() if index is None else index


# Forward plans depend on shapes, strides, dtypes and settings, not on the data pointers: a plan
# is made once per such key and its four pointer arguments are replaced on every call.
_POINTER_ARGS = (0, 9, 16, 17)  # input, rois, output, argmax in plan_forward's argument list
_plans: dict[tuple, kernels.Launch | None] = {}
_MAX_CACHED_PLANS = 256


def _plan_key(problem: RoIPoolProblem, with_argmax: bool, device: int) -> tuple:
    x, rois = problem.input, problem.rois
    settings = (
        kernels.TARGET_BLOCK_ELEMENTS,
        kernels.UNIT_BLOCK_ELEMENTS_CACHED,
        kernels.UNIT_BLOCK_ELEMENTS_STREAMED,
        kernels.MAX_CACHED_EDGES,
        kernels.CHAN_MIN_CHANNELS,
        os.environ.get("ROI_OPS_CUPY_KERNEL"),
        os.environ.get("ROI_OPS_CUPY_BLOCK_ELEMENTS"),
    )
    return (
        device,
        x.shape,
        x.stride(),
        x.dtype,
        rois.shape,
        rois.stride(),
        rois.dtype,
        problem.pooled_height,
        problem.pooled_width,
        problem.spatial_scale,
        with_argmax,
        settings,
    )


def forward(problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None) -> None:
    """Fill `output` and, unless None, `argmax` (see `roi_ops.Backend.forward`)."""
    device = _device_index(problem.input)
    key = _plan_key(problem, argmax is not None, device)
    if key in _plans:
        plan = _plans[key]
        if plan is None:
            return
        args = list(plan.args)
        pointers = (problem.input, problem.rois, output, argmax)
        for position, tensor in zip(_POINTER_ARGS, pointers, strict=True):
            args[position] = np.uint64(0 if tensor is None else tensor.data_ptr())
        plan = dataclasses.replace(plan, args=tuple(args))
    else:
        plan = kernels.plan_forward(problem, output, argmax, *_device_sizes(device))
        if len(_plans) >= _MAX_CACHED_PLANS:
            _plans.clear()
        _plans[key] = plan
        if plan is None:
            return
    _run(device, plan, kernels.forward_names(problem.input.dtype, problem.rois.dtype))


def backward(
    grad_output: torch.Tensor,
    argmax: torch.Tensor,
    batch_index: torch.Tensor,
    input_shape: tuple[int, int, int, int],
    input_dtype: torch.dtype,
) -> torch.Tensor:
    """grad_input by an atomic scatter (not run-to-run deterministic in its last bits).

    Returns:
        (N, C, H, W) contiguous tensor of `input_dtype`; float16/bfloat16 are accumulated in
        float32 and rounded once.
    """
    device = _device_index(grad_output)
    accumulate = kernels.accumulate_dtype(input_dtype)
    grad_input = torch.zeros(input_shape, dtype=accumulate, device=grad_output.device)
    grad_output = grad_output.to(input_dtype)
    argmax = argmax.contiguous()  # kept referenced until the launch is queued
    multiprocessors = _device_sizes(device)[0]
    launch = kernels.plan_backward(grad_output, argmax, batch_index, grad_input, multiprocessors)
    if launch is not None:
        _run(device, launch, (launch.name,))
    return grad_input if accumulate == input_dtype else grad_input.to(input_dtype)
