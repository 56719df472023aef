"""Running one call on a backend: the forward and backward bodies that every path shares.

The eager fast path (`roi_ops.autograd.RoIPoolFunction`), the ``roi_ops::roi_pool`` custom op
(what torch.compile, torch.export and TorchScript see) and its backward op all run these two
functions. They allocate the outputs, apply the value checks (`roi_ops.config`), choose the
backend and call it.

The backward runs on the backend that ran the forward: every forward that produces an argmax
records which backend produced it (keyed by the argmax's memory, which stays alive while it is
saved for backward), so a `use_backend` block that ended, or a changed ``ROI_OPS_BACKEND``,
cannot change it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import bad_rois, host_memory
from .backend import Backend, RoIPoolBackwardProblem, RoIPoolProblem, device_type_of
from .config import poisoning_enabled, value_check_mode
from .dispatch import BackendError, resolve_backend
from .scatter import scatter_backward
from .validation import check_roi_values, check_roi_values_cpu

# argmax data pointer -> the backend whose forward wrote it. A live argmax's entry is always its
# own (an address is reused only after the tensor there is freed, and every forward re-records
# it); the table is trimmed by age so it stays small.
_argmax_owner: dict[int, Backend] = {}
_MAX_OWNERS = 1 << 16


def record_owner(argmax: Tensor, backend: object) -> None:
    """Remember that `backend` (or any token) wrote `argmax`."""
    pointer = argmax.data_ptr()
    if pointer:
        owners = _argmax_owner
        owners.pop(pointer, None)  # re-inserted last: the newest entries survive a trim
        owners[pointer] = backend
        if len(owners) > _MAX_OWNERS:
            for stale in list(owners)[: _MAX_OWNERS // 4]:
                del owners[stale]


def owner_of(argmax: Tensor) -> object | None:
    """The backend whose forward wrote `argmax`, if it is known."""
    pointer = argmax.data_ptr()
    return _argmax_owner.get(pointer) if pointer else None


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def start_value_checks(
    reports: bool, rois: Tensor, num_images: int, device: torch.device
) -> Tensor | None:
    """Apply the value-check mode before a forward: check the ROIs now (CPU; immediate mode),
    record them on the device without waiting (CUDA, for a backend that does not report), or
    return the log a reporting backend (`reports`) must write into. None when no log."""
    mode = value_check_mode()
    if mode == "off":
        return None
    kind = device_type_of(rois)  # the rois are on the input's device
    if kind == "cpu":
        if reports:
            return bad_rois.cpu_log()
        check_roi_values_cpu(rois, num_images)
    elif kind == "cuda" and mode == "on":
        if reports:
            return bad_rois.cuda_kernel_log(device)
        bad_rois.record_on_cuda(rois, num_images, copy=not _capturing(device))
    elif not _capturing(device):  # immediate mode, or another device type
        check_roi_values(rois, num_images)
    return None


def finish_value_checks(log: Tensor, device: torch.device) -> None:
    """After a reporting backend's forward: raise what a CPU call recorded, or bring a CUDA
    call's record towards the host (without waiting)."""
    if device.type == "cuda":
        bad_rois.after_cuda_forward(device)
    else:
        bad_rois.raise_cpu(log)


def call_forward(backend: Backend, method, problem, output: Tensor, argmax: Tensor | None) -> None:
    """``method(problem, output, argmax)`` of `backend`, its failures named as BackendError."""
    try:
        returned = method(problem, output, argmax)
    except Exception as error:
        raise BackendError(
            f"backend {backend.name!r} failed in forward: {type(error).__name__}: {error}"
        ) from error
    if returned is not None:
        raise BackendError(
            f"backend {backend.name!r}: forward returned {type(returned).__name__}; it must fill "
            "the output buffers it is given and return None"
        )


def _outputs(input: Tensor, shape: tuple[int, ...], needs_argmax: bool):
    """The forward's uninitialised (output, int32 argmax or None): large CPU ones on reused
    buffers (`host_memory`)."""
    if input.device.type == "cpu":
        argmax = host_memory.empty(shape, _INT32) if needs_argmax else None
        return host_memory.empty(shape, input.dtype), argmax
    # new_empty: the input's dtype and device without parsing them again (a small call's host
    # time is what this path is measured by).
    output = input.new_empty(shape)
    return output, input.new_empty(shape, dtype=_INT32) if needs_argmax else None


def run_forward(
    problem: RoIPoolProblem, backend: str
) -> tuple[Tensor, Tensor | None, Backend | None]:
    """The forward of one validated call, `problem`, for the request ``backend=`` `backend`.

    Returns (output (K, C, PH, PW), int32 argmax of the same shape or None when not
    ``problem.needs_argmax``, the backend that ran; None for meta tensors, which only get
    shapes).

    Raises:
        ValueError: invalid ROI rows found by the value checks (this call's on the CPU or in
            immediate mode; an earlier call's on CUDA).
        BackendNotFoundError, BackendUnavailableError: see `roi_ops.resolve_backend`.
        BackendError: the chosen backend failed.
    """
    input, rois = problem.input, problem.rois
    shape = (rois.shape[0], input.shape[1], problem.pooled_height, problem.pooled_width)
    output, argmax = _outputs(input, shape, problem.needs_argmax)
    if input.is_meta:
        return output, argmax, None
    device = input.device
    cuda = input.is_cuda
    if cuda:
        bad_rois.raise_pending(device)
    chosen = resolve_backend(backend, problem)
    log = start_value_checks(chosen.reports_bad_rois, rois, input.shape[0], device)
    problem.bad_roi_log = log
    if poisoning_enabled():
        output.fill_(float("nan"))
        if argmax is not None:
            argmax.fill_(-7)
    call_forward(chosen, chosen.forward, problem, output, argmax)
    if log is not None and not (cuda and bad_rois.KERNEL_LOG_IN_HOST_MEMORY):
        finish_value_checks(log, device)
    if argmax is not None:
        record_owner(argmax, chosen)
    return output, argmax, chosen


_INT32 = torch.int32
_CHANNELS_LAST = torch.channels_last
_CONTIGUOUS = torch.contiguous_format


def _check_plugin_gradient(
    backend: Backend, grad: object, shape: tuple[int, ...], dtype, device, memory_format
) -> Tensor:
    """The plugin's gradient, dense in `memory_format` (copied into it when it is not)."""
    if not isinstance(grad, Tensor):
        raise BackendError(
            f"backend {backend.name!r}: backward returned {type(grad).__name__}, expected a "
            "Tensor or None"
        )
    if grad.shape != shape or grad.dtype != dtype or grad.device != device:
        raise BackendError(
            f"backend {backend.name!r}: backward returned a {tuple(grad.shape)} "
            f"{grad.dtype} tensor on {grad.device}, expected {tuple(shape)} {dtype} on {device}"
        )
    return grad.contiguous(memory_format=memory_format)  # no copy when it already is


def _backend_for_backward(
    argmax: Tensor, spec: str, shape: tuple[int, ...], dtype: torch.dtype, rois: Tensor
) -> Backend:
    owner = owner_of(argmax)
    if owner is not None:
        return owner
    # Not recorded (a backward op called by hand): resolve the request as the forward would.
    stand_in = torch.empty((), dtype=dtype, device=argmax.device).expand(shape)
    problem = RoIPoolProblem(stand_in, rois, argmax.shape[2], argmax.shape[3], 1.0, True)
    return resolve_backend(spec, problem)


def run_backward(
    grad_output: Tensor,
    rois: Tensor,
    argmax: Tensor,
    input_shape: tuple[int, int, int, int],
    input_dtype: torch.dtype,
    channels_last: bool,
    spec: str,
) -> Tensor:
    """grad_input (N, C, H, W) of `input_dtype` from `grad_output` (K, C, PH, PW) and the
    forward's argmax, dense in channels_last when `channels_last` (the input's layout) and
    contiguous otherwise.

    Runs the backward of the backend that ran the forward, or roi_ops' shared deterministic
    scatter when that backend has none, or under ``torch.use_deterministic_algorithms(True)``
    when its backward is not deterministic.
    """
    memory_format = _CHANNELS_LAST if channels_last else _CONTIGUOUS
    if grad_output.is_meta:
        return torch.empty(
            input_shape, dtype=input_dtype, device="meta", memory_format=memory_format
        )
    if grad_output.is_cuda:
        bad_rois.raise_pending(grad_output.device)
    chosen = _backend_for_backward(argmax, spec, input_shape, input_dtype, rois)
    asked = memory_format if memory_format in chosen.gradient_formats else _CONTIGUOUS
    problem = RoIPoolBackwardProblem(
        grad_output,
        argmax,
        rois,
        input_shape,
        input_dtype,
        asked,
        torch.are_deterministic_algorithms_enabled(),
    )
    return backward_on(chosen, problem, memory_format)


def backward_on(
    chosen: Backend, problem: RoIPoolBackwardProblem, memory_format: torch.memory_format
) -> Tensor:
    """grad_input of `problem` dense in `memory_format`: `chosen`'s backward, or the shared
    deterministic scatter when it has none or when deterministic mode excludes it."""
    grad = None
    if chosen.deterministic_backward or not problem.deterministic:
        try:
            grad = chosen.backward(problem)
        except Exception as error:
            raise BackendError(
                f"backend {chosen.name!r} failed in backward: {type(error).__name__}: {error}"
            ) from error
    grad_output = problem.grad_output
    if grad is None:
        return scatter_backward(
            grad_output,
            problem.argmax,
            problem.batch_index,
            torch.Size(problem.input_shape),
            problem.input_dtype,
            memory_format,
        )
    grad = _check_plugin_gradient(
        chosen, grad, problem.input_shape, problem.input_dtype, grad_output.device, memory_format
    )
    # The result must not alias an input (custom ops forbid it, and autograd would let the
    # caller's gradient share memory with the backward's inputs): copy it in that rare case.
    storage = _storage_address(grad)
    if (
        storage == _storage_address(grad_output)
        or storage == _storage_address(problem.rois)
        or storage == _storage_address(problem.argmax)
    ):
        return grad.clone()
    return grad


def _storage_address(tensor: Tensor) -> int:
    """The address of `tensor`'s storage (what ``untyped_storage().data_ptr()`` gives, without
    making a storage object)."""
    return tensor.data_ptr() - tensor.storage_offset() * tensor.element_size()
