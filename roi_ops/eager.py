"""The eager fast path: `roi_pool` as a `torch.autograd.Function` when nothing is tracing.

The ``roi_ops::roi_pool`` custom op is what torch.compile, torch.export, FakeTensor and opcheck
see; its Python dispatch costs tens to hundreds of microseconds per call, more than a small
GPU kernel takes. In plain eager mode (no compile, no JIT tracing, no functorch transform, no
dispatch or function mode, plain tensors) `roi_pool` calls the same forward and backward bodies
(`roi_ops.ops.roi_pool_forward`, `roi_ops.ops.roi_pool_backward`) through this Function instead;
its backward runs on the backend that ran the forward, without resolving the request again.
Results are identical; ``ROI_OPS_EAGER_FAST_PATH=0`` always takes the custom op.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .config import env_flag
from .layout import gradient_memory_format
from .ops import backward_on_backend, backward_op_from_context, forward_on_backend

EAGER_FAST_PATH_ENV = "ROI_OPS_EAGER_FAST_PATH"

# Private torch probes (present in torch 2.11 and 2.13); without them the fast path stays off.
_function_mode_enabled = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_functorch = getattr(torch._C, "_functorch", None)
_interpreter_stack = getattr(_functorch, "peek_interpreter_stack", None)
_PROBES_AVAILABLE = _function_mode_enabled is not None and _interpreter_stack is not None


def fast_path_enabled() -> bool:
    """Whether ``ROI_OPS_EAGER_FAST_PATH`` allows the fast path (on unless 0/false/off/no)."""
    return env_flag(EAGER_FAST_PATH_ENV)


def plain_eager(input: Tensor, rois: Tensor) -> bool:
    """True when a call on these tensors can skip the custom op without anyone noticing."""
    return (
        _PROBES_AVAILABLE
        and type(input) is Tensor
        and type(rois) is Tensor
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _get_current_dispatch_mode() is None
        and not _function_mode_enabled()
        and _interpreter_stack() is None
        and fast_path_enabled()
    )


class RoIPoolFunction(torch.autograd.Function):
    """roi_pool with the custom op's semantics; double backward goes through the backward op."""

    @staticmethod
    def forward(ctx, input, rois, pooled_height, pooled_width, scale, backend, needs_argmax):
        output, argmax, chosen = forward_on_backend(
            input, rois, pooled_height, pooled_width, scale, backend, needs_argmax
        )
        ctx.input_shape = input.shape
        ctx.input_dtype = input.dtype
        ctx.channels_last = gradient_memory_format(input) == torch.channels_last
        ctx.backend = backend
        ctx.chosen = chosen
        if needs_argmax:
            ctx.save_for_backward(rois, argmax)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.saved_tensors:
            raise RuntimeError(
                "roi_ops.roi_pool ran without an argmax (its input did not require grad), so it "
                "cannot be differentiated"
            )
        if torch.is_grad_enabled():  # create_graph: record the op, whose gradient is a gather
            grad_input = backward_op_from_context(ctx, grad_output)
        else:
            rois, argmax = ctx.saved_tensors
            grad_input = backward_on_backend(
                ctx.chosen,
                grad_output,
                rois,
                argmax,
                ctx.input_shape,
                ctx.input_dtype,
                ctx.channels_last,
            )
        return grad_input, None, None, None, None, None, None
