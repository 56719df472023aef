"""The one autograd definition of roi_pool, shared by the custom op and the eager fast path.

`setup_context` (what a forward saves) and `backward` are registered on the
``roi_ops::roi_pool`` custom op (torch.compile, torch.export, TorchScript and tracing see that
op) and are also what `RoIPoolFunction`, the eager fast path, runs. The op's Python dispatch
costs tens of microseconds per call, more than a small GPU kernel takes, so in plain eager mode
(no compile, no tracing, no functorch transform, no dispatch or function mode, plain tensors)
`roi_ops.roi_pool` calls the same forward body (`roi_ops.execute.run_forward`) through this
Function instead, or, once `roi_ops.native` is built, attaches its C++ node, which saves the same
state and calls the same `gradient`; inference calls skip autograd altogether. Results are
identical.

Saved state: rois, argmax, the input's shape, dtype and gradient layout, and the backend
request. The backward runs on the backend that ran the forward (`roi_ops.execute`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import native, ops
from .backend import RoIPoolProblem
from .execute import run_backward, run_forward
from .layout import gradient_memory_format

# Private torch probes (present in torch 2.6 to 2.13); without them the fast path stays off.
_function_mode_enabled = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_functorch = getattr(torch._C, "_functorch", None)
_interpreter_stack = getattr(_functorch, "peek_interpreter_stack", None)
FAST_PATH_AVAILABLE = _function_mode_enabled is not None and _interpreter_stack is not None


def plain_eager(*tensors: Tensor) -> bool:
    """True when a call on these tensors (the input or every pyramid level, and the rois) can
    skip the custom op without anyone noticing: plain tensors, and no compiler, tracer,
    dispatch or function mode, or functorch transform active."""
    return (
        FAST_PATH_AVAILABLE
        and all(type(t) is Tensor for t in tensors)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _get_current_dispatch_mode() is None
        and not _function_mode_enabled()
        and _interpreter_stack() is None
    )


def setup_context(ctx, inputs: tuple, output: tuple) -> None:
    """Save what the backward needs (inputs and output of ``roi_ops::roi_pool``)."""
    input, rois, _, _, _, backend, needs_argmax = inputs
    ctx.input_shape = tuple(input.shape)
    ctx.input_dtype = input.dtype
    ctx.channels_last = gradient_memory_format(input) == torch.channels_last
    ctx.backend = backend
    ctx.needs_argmax = needs_argmax
    if needs_argmax:
        ctx.save_for_backward(rois, output[1])


def backward(ctx, grad_output: Tensor, _grad_argmax: Tensor | None = None) -> tuple:
    """Gradients of ``roi_ops::roi_pool``'s inputs (only `input` gets one)."""
    if not ctx.needs_argmax:
        raise RuntimeError(
            "roi_ops.roi_pool ran without an argmax (its input did not require grad, or grad "
            "mode was off), so it cannot be differentiated; call it with an input that "
            "requires grad, with grad mode on"
        )
    rois, argmax = ctx.saved_tensors
    grad_input = gradient(
        grad_output,
        rois,
        argmax,
        ctx.input_shape,
        ctx.input_dtype,
        ctx.channels_last,
        ctx.backend,
        getattr(ctx, "eager", False),
    )
    return grad_input, None, None, None, None, None, None


def gradient(
    grad_output: Tensor,
    rois: Tensor,
    argmax: Tensor,
    input_shape: tuple[int, int, int, int],
    input_dtype: torch.dtype,
    channels_last: bool,
    backend: str,
    eager: bool = True,
) -> Tensor:
    """The input's gradient from what a forward saved; the backward of every autograd path
    (the custom op, `RoIPoolFunction` and the C++ node of `roi_ops.native`).

    Under grad mode (double backward), or from a compiled graph (`eager` False), it is recorded
    as the backward op, whose own gradient is a gather, so compiled graphs see an op rather than
    Python; else the backend that ran the forward computes it directly (`roi_ops.execute`).
    """
    if torch.is_grad_enabled() or not eager:
        return ops.roi_pool_backward_op(
            grad_output, rois, argmax, *input_shape, input_dtype, backend, channels_last
        )
    return run_backward(grad_output, rois, argmax, input_shape, input_dtype, channels_last, backend)


class RoIPoolFunction(torch.autograd.Function):
    """The eager fast path of a call that needs a gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, input, rois, pooled_height, pooled_width, scale, backend, needs_argmax):
        inputs = (input, rois, pooled_height, pooled_width, scale, backend, needs_argmax)
        problem = RoIPoolProblem(input, rois, pooled_height, pooled_width, scale, needs_argmax)
        output, argmax, _ = run_forward(problem, backend)
        setup_context(ctx, inputs, (output, argmax))
        ctx.eager = True
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return backward(ctx, grad_output)


# The C++ apply beneath torch.autograd.Function.apply. The Python wrapper only binds default
# arguments (this Function has no setup_context and no defaults) and unwraps the functorch
# wrappers of transforms that have exited; `apply_with_gradient` takes that path itself when
# its input is such a wrapper.
_apply_without_wrapper = torch._C._FunctionBase.__dict__["apply"].__get__(None, RoIPoolFunction)
_is_functorch_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", None)


def apply_with_gradient(
    input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int, scale: float, backend: str
) -> Tensor:
    """`RoIPoolFunction.apply` of validated arguments on the eager fast path (the caller
    checked `plain_eager`): roi_pool's output with its argmax kept, recorded for autograd."""
    attach = native.attach
    wrapped = _is_functorch_wrapped is None or _is_functorch_wrapped(input)
    if attach is not None and not wrapped:
        # The C++ node (`roi_ops.native`): the same forward, state and gradient as the Function.
        _set_grad_enabled(False)  # as inside Function.forward; the caller checked it was on
        try:
            problem = RoIPoolProblem(input, rois, pooled_height, pooled_width, scale, True)
            output, argmax, _ = run_forward(problem, backend)
        finally:
            _set_grad_enabled(True)
        channels_last = gradient_memory_format(input) == _CHANNELS_LAST
        return attach(input, output, rois, argmax, input.shape, input.dtype, channels_last, backend)
    native.start()
    arguments = (input, rois, pooled_height, pooled_width, scale, backend, True)
    if wrapped:
        return RoIPoolFunction.apply(*arguments)
    return _apply_without_wrapper(*arguments)


_set_grad_enabled = torch._C._set_grad_enabled
_CHANNELS_LAST = torch.channels_last
