"""The ``roi_ops::roi_pool`` and ``roi_ops::roi_pool_backward`` custom ops and their fake kernels,
and ``roi_ops::roi_pool_jit``, the op TorchScript graphs record.

What torch.compile, torch.export, FakeTensor, TorchScript and opcheck see. The op takes the
backend request as a string and resolves it inside, on real tensors, so the choice (including
`use_backend` and ``ROI_OPS_BACKEND``) is made at run time even inside a compiled graph. Both
bodies are `roi_ops.execute`'s, shared with the eager fast path; the autograd definition is
`roi_ops.autograd`'s. The backward op's own gradient is a gather at the argmax, so double
backward works.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from .backend import RoIPoolProblem
from .execute import run_backward, run_forward
from .scatter import batch_indices, gather_at_argmax


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
    problem = RoIPoolProblem(input, rois, pooled_height, pooled_width, spatial_scale, needs_argmax)
    output, argmax, _ = run_forward(problem, backend)
    if argmax is None:
        argmax = input.new_empty((0,), dtype=torch.int32)
    return output, argmax


def register_onnx_if_exporting() -> None:
    """`roi_ops.onnx.register` when a torch.onnx export is running (it traces the model, so this
    runs before the exporter looks up its translations)."""
    onnx = sys.modules.get("torch.onnx")
    if onnx is not None and onnx.is_in_onnx_export():
        from .onnx import register, register_in_running_export

        register()
        register_in_running_export()


@roi_pool_op.register_fake
def _roi_pool_fake(input, rois, pooled_height, pooled_width, spatial_scale, backend, needs_argmax):
    register_onnx_if_exporting()  # the dynamo exporter traces with fake tensors
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    output = input.new_empty(shape)
    argmax = input.new_empty(shape if needs_argmax else (0,), dtype=torch.int32)
    return output, argmax


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
    dense in channels_last when `channels_last`, else contiguous. `backend` is the forward's
    request, used only when the backend that wrote `argmax` is not known."""
    shape = (num_images, channels, height, width)
    return run_backward(grad_output, rois, argmax, shape, input_dtype, channels_last, backend)


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
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(
        (num_images, channels, height, width),
        dtype=input_dtype,
        device=grad_output.device,
        memory_format=memory_format,
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

from . import autograd  # noqa: E402  (uses the ops above)

roi_pool_op.register_autograd(autograd.backward, setup_context=autograd.setup_context)


# TorchScript graphs (torch.jit.script and torch.jit.trace) record ``roi_pool_jit``: it decides
# at run time whether an argmax is needed, from grad mode and the input, so one graph serves
# inference and training (a trace taken under no_grad still trains), and the graph holds no
# requires_grad test that ONNX could not express. CompositeImplicitAutograd: it runs as the
# roi_pool op, so autograd, compile and export see only that.
_library = torch.library.Library("roi_ops", "FRAGMENT")
_library.define(
    "roi_pool_jit(Tensor input, Tensor rois, SymInt pooled_height, SymInt pooled_width, "
    "float spatial_scale, str backend) -> Tensor"
)


def _roi_pool_jit(input, rois, pooled_height, pooled_width, spatial_scale, backend):
    register_onnx_if_exporting()  # exporting a traced or scripted model runs it once
    needs_argmax = input.requires_grad and torch.is_grad_enabled()
    output, _ = roi_pool_op(
        input, rois, pooled_height, pooled_width, spatial_scale, backend, needs_argmax
    )
    return output


_library.impl("roi_pool_jit", _roi_pool_jit, "CompositeImplicitAutograd")
