"""The `roi_ops::roi_pool` custom op, its fake kernel and autograd, and the shared backward.

The op takes the backend request as a string and resolves it inside, on real tensors, so the
choice (including `use_backend` and ``ROI_OPS_BACKEND``) is made at run time even inside a
compiled graph. Backward is a second op, `roi_ops::roi_pool_backward`, whose own gradient is a
gather at the argmax, so double backward works.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import Backend, RoIPoolBackwardProblem, RoIPoolProblem
from .config import poisoning_enabled, value_checks_enabled
from .dispatch import BackendError, resolve_backend
from .layout import gradient_memory_format
from .validation import check_roi_values

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _empty_argmax(shape, device: torch.device, needs_argmax: bool) -> Tensor:
    return torch.empty(shape if needs_argmax else (0,), dtype=torch.int32, device=device)


def roi_pool_forward(
    input: Tensor,
    rois: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    backend: str,
    needs_argmax: bool,
) -> tuple[Tensor, Tensor]:
    """The forward body shared by the custom op and the eager fast path (`roi_ops.eager`).

    Takes validated arguments; returns (output (K, C, PH, PW), int32 argmax of the same shape, or
    an empty one when not `needs_argmax`). Raises BackendError when the chosen backend fails.
    """
    output, argmax, _ = forward_on_backend(
        input, rois, pooled_height, pooled_width, spatial_scale, backend, needs_argmax
    )
    return output, argmax


def forward_on_backend(
    input: Tensor,
    rois: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    backend: str,
    needs_argmax: bool,
) -> tuple[Tensor, Tensor, Backend]:
    """`roi_pool_forward`, also returning the backend that ran (the eager path's backward reuses
    it instead of resolving the request again)."""
    problem = RoIPoolProblem(input, rois, pooled_height, pooled_width, spatial_scale, needs_argmax)
    if value_checks_enabled() and not _capturing(input.device):
        check_roi_values(rois, input.shape[0])
    chosen = resolve_backend(backend, problem)
    output = torch.empty(problem.output_shape, dtype=input.dtype, device=input.device)
    argmax = _empty_argmax(problem.output_shape, input.device, needs_argmax)
    if poisoning_enabled():
        output.fill_(float("nan"))
        argmax.fill_(-7)
    try:
        returned = chosen.forward(problem, output, argmax if needs_argmax else None)
    except Exception as error:
        raise BackendError(
            f"backend {chosen.name!r} failed in forward: {type(error).__name__}: {error}"
        ) from error
    if returned is not None:
        raise BackendError(
            f"backend {chosen.name!r}: forward returned {type(returned).__name__}; it must fill "
            "the output buffers it is given and return None"
        )
    return output, argmax, chosen


@torch.library.custom_op("roi_ops::roi_pool", mutates_args=())
def roi_pool_op(
    input: Tensor,
    rois: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    backend: str,
    needs_argmax: bool,
) -> tuple[Tensor, Tensor]:
    """(output, argmax) for validated arguments; argmax is empty when not `needs_argmax`."""
    return roi_pool_forward(
        input, rois, pooled_height, pooled_width, spatial_scale, backend, needs_argmax
    )


@roi_pool_op.register_fake
def _roi_pool_fake(input, rois, pooled_height, pooled_width, spatial_scale, backend, needs_argmax):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    output = input.new_empty(shape)
    return output, _empty_argmax(shape, input.device, needs_argmax)


def batch_indices(rois: Tensor, num_images: int) -> Tensor:
    """(K,) int64 batch index of each ROI, in [0, N).

    Valid ROIs get trunc(rois[:, 0]); the others (whose argmax is all -1, so they get no
    gradient) get some index in [0, N). Two kernels: this runs on every backward call.
    """
    return rois[:, 0].to(torch.int64).clamp_(0, max(num_images - 1, 0))


def _flat_positions(argmax: Tensor, batch_index: Tensor, channels: int, plane: int) -> Tensor:
    """(K, C, PH, PW) int64 index of each argmax in the flattened (N*C*H*W) input."""
    channel = torch.arange(channels, device=argmax.device)
    base = (batch_index[:, None] * channels + channel[None, :]) * plane
    return base[:, :, None, None] + argmax.clamp(min=0).to(torch.int64)


def _channels_last_positions(argmax: Tensor, batch_index: Tensor, channels: int, plane: int):
    """(K, C, PH, PW) int64 index of each argmax in the flattened (N*H*W*C) input."""
    channel = torch.arange(channels, device=argmax.device)
    pixel = batch_index[:, None, None, None] * plane + argmax.clamp(min=0).to(torch.int64)
    return pixel * channels + channel[None, :, None, None]


def scatter_backward(
    grad_output: Tensor,
    argmax: Tensor,
    batch_index: Tensor,
    input_shape: tuple[int, int, int, int],
    input_dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """The shared backward: grad_input[b_k, c].flat[argmax] += grad_output.

    Accumulates float16/bfloat16 in float32 and rounds once. `index_put_` with accumulate is
    run-to-run deterministic under ``torch.use_deterministic_algorithms(True)``.

    Returns:
        (N, C, H, W) tensor of `input_dtype`, dense in `memory_format` (contiguous_format or
        channels_last).
    """
    num_images, channels, height, width = input_shape
    accumulate = torch.float32 if input_dtype in _HALF_DTYPES else input_dtype
    grad = torch.zeros(
        num_images * channels * height * width, dtype=accumulate, device=grad_output.device
    )
    channels_last = memory_format == torch.channels_last
    if argmax.numel():
        flat = _channels_last_positions if channels_last else _flat_positions
        positions = flat(argmax, batch_index, channels, height * width)
        hit = argmax >= 0
        grad.index_put_((positions[hit],), grad_output.to(accumulate)[hit], accumulate=True)
    if channels_last:  # .to keeps the strides of the (N, H, W, C) buffer
        return grad.view(num_images, height, width, channels).permute(0, 3, 1, 2).to(input_dtype)
    return grad.view(input_shape).to(input_dtype)


def gather_at_argmax(grad_input_grad: Tensor, argmax: Tensor, batch_index: Tensor) -> Tensor:
    """Gradient of the backward: grad_input_grad[b_k, c].flat[argmax] (0 where argmax is -1)."""
    _, channels, height, width = grad_input_grad.shape
    positions = _flat_positions(argmax, batch_index, channels, height * width)
    gathered = grad_input_grad.reshape(-1)[positions]
    return torch.where(argmax >= 0, gathered, torch.zeros_like(gathered))


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _check_plugin_gradient(
    backend: Backend, grad: object, shape, dtype, device, memory_format
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


def roi_pool_backward(
    grad_output: Tensor,
    rois: Tensor,
    argmax: Tensor,
    num_images: int,
    channels: int,
    height: int,
    width: int,
    input_dtype: torch.dtype,
    backend: str,
    channels_last: bool = False,
) -> Tensor:
    """The backward body shared by the custom op and the eager fast path.

    Returns grad_input (N, C, H, W) of `input_dtype` from `grad_output` (K, C, PH, PW) and the
    forward's argmax, dense in channels_last when `channels_last` (the input's layout, see
    `roi_ops.layout.gradient_memory_format`) and contiguous otherwise; the backend's own
    backward, or `scatter_backward` when it has none.
    """
    shape = torch.Size((num_images, channels, height, width))
    # A zero-stride stand-in: backends choose by device and dtype, no memory is touched.
    stand_in = torch.empty((), dtype=input_dtype, device=grad_output.device).expand(shape)
    problem = RoIPoolProblem(
        stand_in, rois, argmax.shape[2], argmax.shape[3], 1.0, needs_argmax=True
    )
    chosen = resolve_backend(backend, problem)
    return backward_on_backend(chosen, grad_output, rois, argmax, shape, input_dtype, channels_last)


def backward_on_backend(
    chosen: Backend,
    grad_output: Tensor,
    rois: Tensor,
    argmax: Tensor,
    shape: torch.Size,
    input_dtype: torch.dtype,
    channels_last: bool = False,
) -> Tensor:
    """`roi_pool_backward` on an already chosen backend (grad_input of `shape`, dense in
    channels_last when `channels_last`, else contiguous)."""
    memory_format = _memory_format(channels_last)
    deterministic = torch.are_deterministic_algorithms_enabled()
    asked = memory_format if memory_format in chosen.gradient_formats else torch.contiguous_format
    problem = RoIPoolBackwardProblem(
        grad_output, argmax, rois, tuple(shape), input_dtype, asked, deterministic
    )
    grad = None
    if chosen.deterministic_backward or not deterministic:
        try:
            grad = chosen.backward(problem)
        except Exception as error:
            raise BackendError(
                f"backend {chosen.name!r} failed in backward: {type(error).__name__}: {error}"
            ) from error
    if grad is None:
        return scatter_backward(
            grad_output, argmax, problem.batch_index, tuple(shape), input_dtype, memory_format
        )
    grad = _check_plugin_gradient(
        chosen, grad, shape, input_dtype, grad_output.device, memory_format
    )
    # The result must not alias an input (custom ops forbid it, and autograd would let the
    # caller's gradient share memory with the backward's inputs): copy it in that rare case.
    storages = {t.untyped_storage().data_ptr() for t in (grad_output, rois, argmax)}
    return grad.clone() if grad.untyped_storage().data_ptr() in storages else grad


@torch.library.custom_op("roi_ops::roi_pool_backward", mutates_args=())
def roi_pool_backward_op(
    grad_output: Tensor,
    rois: Tensor,
    argmax: Tensor,
    num_images: int,
    channels: int,
    height: int,
    width: int,
    input_dtype: torch.dtype,
    backend: str,
    channels_last: bool = False,
) -> Tensor:
    """grad_input (N, C, H, W) of `input_dtype` from `grad_output` and the forward's argmax,
    dense in channels_last when `channels_last`, else contiguous. (`channels_last` has a
    default so that graphs compiled before it existed still call the op.)"""
    return roi_pool_backward(
        grad_output,
        rois,
        argmax,
        num_images,
        channels,
        height,
        width,
        input_dtype,
        backend,
        channels_last,
    )


@roi_pool_backward_op.register_fake
def _roi_pool_backward_fake(
    grad_output,
    rois,
    argmax,
    num_images,
    channels,
    height,
    width,
    input_dtype,
    backend,
    channels_last=False,
):
    shape = (num_images, channels, height, width)
    return torch.empty(
        shape,
        dtype=input_dtype,
        device=grad_output.device,
        memory_format=_memory_format(channels_last),
    )


def _backward_setup(ctx, inputs, output) -> None:
    grad_output, rois, argmax, num_images, *_ = inputs
    ctx.num_images = num_images
    ctx.save_for_backward(rois, argmax)


def _backward_backward(ctx, grad_grad_input):
    rois, argmax = ctx.saved_tensors
    batch_index = batch_indices(rois, ctx.num_images)
    grad_grad_output = gather_at_argmax(grad_grad_input, argmax, batch_index)
    return grad_grad_output, None, None, None, None, None, None, None, None, None


roi_pool_backward_op.register_autograd(_backward_backward, setup_context=_backward_setup)


def _forward_setup(ctx, inputs, output) -> None:
    input, rois, _, _, _, backend, needs_argmax = inputs
    ctx.input_shape = tuple(input.shape)
    ctx.input_dtype = input.dtype
    ctx.channels_last = gradient_memory_format(input) == torch.channels_last
    ctx.backend = backend
    ctx.needs_argmax = needs_argmax
    ctx.save_for_backward(rois, output[1])


def backward_op_from_context(ctx, grad_output: Tensor) -> Tensor:
    """``roi_ops::roi_pool_backward`` on what a forward saved in `ctx` (the custom op's or the
    eager Function's: rois and argmax saved, input_shape, input_dtype, backend and
    channels_last set): a recorded, differentiable backward."""
    rois, argmax = ctx.saved_tensors
    return roi_pool_backward_op(
        grad_output,
        rois,
        argmax,
        *ctx.input_shape,
        ctx.input_dtype,
        ctx.backend,
        ctx.channels_last,
    )


def _forward_backward(ctx, grad_output, _grad_argmax):
    if not ctx.needs_argmax:
        raise RuntimeError(
            "roi_ops::roi_pool was called with needs_argmax=False, so it cannot be "
            "differentiated; call roi_ops.roi_pool with an input that requires grad"
        )
    grad_input = backward_op_from_context(ctx, grad_output)
    return grad_input, None, None, None, None, None, None


roi_pool_op.register_autograd(_forward_backward, setup_context=_forward_setup)
