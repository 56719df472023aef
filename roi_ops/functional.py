"""The user-facing `roi_pool` function and the `RoIPool` module."""

from collections.abc import Sequence

import torch
import torch.fx
from torch import Tensor, nn

from .autograd import apply_with_gradient, plain_eager
from .backend import RoIPoolProblem
from .dispatch import AUTO, Explanation, check_spec, explain_problem
from .execute import run_forward
from .ops import register_onnx_if_exporting, roi_pool_op
from .validation import (
    check_input,
    normalize_output_size,
    normalize_rois,
    normalize_spatial_scale,
)


def _prepare(input, rois, output_size, spatial_scale, backend):
    check_input(input)
    table = normalize_rois(rois, input)
    pooled_height, pooled_width = normalize_output_size(output_size)
    scale = normalize_spatial_scale(spatial_scale)
    if backend is not AUTO and not isinstance(backend, str):
        check_spec(backend)
    return table, pooled_height, pooled_width, scale


@torch.fx.wrap  # a call_function node in torch.fx graphs, as torchvision's roi_pool
def roi_pool(
    input: Tensor,
    rois: Tensor | Sequence[Tensor] | None = None,
    output_size: int | tuple[int, int] | None = None,
    spatial_scale: float = 1.0,
    *,
    boxes: Tensor | Sequence[Tensor] | None = None,
    backend: str = "auto",
) -> Tensor:
    """Region-of-interest max pooling (Fast R-CNN), exactly as docs/contract.md defines it.

    Takes `torchvision.ops.roi_pool`'s arguments (``boxes=`` is its name for `rois`), and works
    under torch.compile, torch.export, torch.fx, TorchScript (script and trace), autocast, meta
    tensors and ONNX export (docs/torchvision.md, docs/deployment.md).

    Args:
        input: (N, C, H, W) float16, bfloat16, float32 or float64 tensor, any strides.
        rois: (K, 5) tensor of (batch_index, x1, y1, x2, y2) rows in image pixels, or a list of
            at most N tensors of shape (L_i, 4) (x1, y1, x2, y2), entry i belonging to image i.
            Same dtype as `input`, or float32 when `input` is float16/bfloat16. Under
            `torch.autocast` any float dtype is accepted and converted to that (float32 for
            float16/bfloat16/float32 inputs), as torchvision does.
        output_size: PH = PW as an int, or (PH, PW); each >= 1. Required.
        spatial_scale: factor from image pixels to feature-map cells (e.g. 1/16); finite, > 0.
        boxes: another name for `rois` (torchvision's); pass one of the two.
        backend: "auto", a backend name (any case), or a comma-separated list of names (first
            usable). See `roi_ops.list_backends()` and `roi_ops.explain`.

    Returns:
        (K, C, PH, PW) contiguous tensor of `input`'s dtype.

    Raises:
        TypeError, ValueError: bad arguments, naming the argument (docs/contract.md, "Bad
            input"). ValueError also for ROI rows with a batch index outside [0, N) or
            non-finite values while value checks are on (`roi_ops.set_value_checks`): at this
            call on the CPU; on CUDA at a later roi_ops call on that device, or at
            `roi_ops.check_errors()`, since a default CUDA call never waits for the device.
        BackendNotFoundError: an unknown backend name.
        BackendUnavailableError: the requested backend(s) cannot run this call (lists reasons).
    """
    try:
        table, pooled_height, pooled_width, scale = _prepare(
            input, rois, output_size, spatial_scale, backend
        )
    except TypeError:
        # Calls the checks refuse but roi_ops serves another way; costs nothing on other calls.
        result = _unusual_call(input, rois, output_size, spatial_scale, boxes, backend)
        if result is None:
            raise
        return result
    if boxes is not None:
        raise TypeError("roi_pool: got both rois and boxes=; pass one of them")
    if table.dtype is _FLOAT16 and _autocasting(input):
        table = table.float()  # float32 geometry under autocast, as torchvision computes it
    needs_argmax = input.requires_grad and torch.is_grad_enabled()
    if plain_eager(input, table):
        if needs_argmax:
            return apply_with_gradient(input, table, pooled_height, pooled_width, scale, backend)
        # Inference: no autograd record to make.
        problem = RoIPoolProblem(input, table, pooled_height, pooled_width, scale, False)
        return run_forward(problem, backend)[0]
    if torch.jit.is_tracing():
        sizes = (pooled_height, pooled_width)
        return _traced_roi_pool(input, table, sizes, scale, backend)
    return roi_pool_op(input, table, pooled_height, pooled_width, scale, backend, needs_argmax)[0]


_FLOAT16 = torch.float16


def _autocasting(input: Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(input.device.type)
    except RuntimeError:  # a device type autocast does not know
        return False


def _autocast_rois(input: object, rois: object) -> Tensor | list[Tensor] | None:
    """`rois` converted to the dtype roi_pool takes under autocast, or None when autocast is off
    or converting changes nothing."""
    if not isinstance(input, Tensor) or not _autocasting(input):
        return None
    target = torch.float64 if input.dtype == torch.float64 else torch.float32

    def convert(boxes: object) -> object:
        if isinstance(boxes, Tensor) and boxes.is_floating_point() and boxes.dtype != target:
            return boxes.to(target)
        return boxes

    if isinstance(rois, Tensor):
        converted = convert(rois)
        return converted if converted is not rois else None
    if isinstance(rois, (list, tuple)):
        converted = [convert(b) for b in rois]
        changed = any(c is not b for c, b in zip(converted, rois, strict=True))
        return converted if changed else None
    return None


def _first_proxy(*values: object) -> torch.fx.Proxy | None:
    for value in values:
        if isinstance(value, torch.fx.Proxy):
            return value
        if isinstance(value, (list, tuple)):
            found = _first_proxy(*value)
            if found is not None:
                return found
    return None


def _unusual_call(input, rois, output_size, spatial_scale, boxes, backend) -> Tensor | None:
    """The result of a call whose arguments failed the checks with a TypeError, when roi_ops
    supports it another way: ``boxes=``, torch.fx proxies (a call_function node), rois of
    another dtype under autocast. None when the checks' error stands."""
    if boxes is not None:
        if rois is not None:
            raise TypeError("roi_pool: got both rois and boxes=; pass one of them")
        rois = boxes
    elif rois is None:
        raise TypeError(
            "roi_pool: missing the boxes; pass rois (or boxes=, torchvision's name for it)"
        )
    if output_size is None:
        raise TypeError("roi_pool: missing required argument output_size (an int or (PH, PW))")
    proxy = _first_proxy(input, rois, output_size, spatial_scale)
    if proxy is not None:
        kwargs = {} if backend == AUTO else {"backend": backend}
        arguments = (input, rois, output_size, spatial_scale)
        # The unpatched function: torch.fx replaces the global `roi_pool` while it traces.
        return proxy.tracer.create_proxy("call_function", _ROI_POOL, arguments, kwargs)
    if boxes is None:
        rois = _autocast_rois(input, rois)
        if rois is None:
            return None
    return _ROI_POOL(input, rois, output_size, spatial_scale, backend=backend)


def _traced_roi_pool(input, table, sizes, scale, backend) -> Tensor:
    """roi_pool under torch.jit.trace: the trace records ``roi_ops::roi_pool_jit``, which
    decides at run time whether an argmax is needed (a trace taken without grad still trains).
    ONNX export traces too: roi_ops.onnx's symbolic turns that op into MaxRoiPool."""
    if not _torchscript_symbolic_registered:
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # importing torch.onnx records nothing
        try:
            _register_torchscript_symbolic()
        finally:
            torch._C._set_tracing_state(state)
    register_onnx_if_exporting()
    return torch.ops.roi_ops.roi_pool_jit(input, table, *sizes, scale, backend)


_torchscript_symbolic_registered = False


def _register_torchscript_symbolic() -> None:
    """A traced or scripted graph may be exported to ONNX later without running roi_ops
    first: register the TorchScript exporter's symbolic when such a graph is made."""
    global _torchscript_symbolic_registered
    from .onnx import register_torchscript

    _torchscript_symbolic_registered = register_torchscript() or True  # tried once


def _scriptable_roi_pool():
    """What torch.jit.script compiles in place of `roi_pool` (see roi_ops.torchscript)."""
    from . import torchscript

    if not _torchscript_symbolic_registered:
        _register_torchscript_symbolic()
    return torchscript.roi_pool


roi_pool.__prepare_scriptable__ = _scriptable_roi_pool
_ROI_POOL = roi_pool


def roi_pool_with_argmax(
    input: Tensor,
    rois: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Like `roi_pool`, also returning the int32 argmax (index h * W + w, -1 for empty bins).

    Not differentiable; meant for tests and inspection.
    """
    table, pooled_height, pooled_width, scale = _prepare(
        input, rois, output_size, spatial_scale, backend
    )
    with torch.no_grad():
        return roi_pool_op(input, table, pooled_height, pooled_width, scale, backend, True)


class RoIPool(nn.Module):
    """Module form of `roi_pool`: ``RoIPool(output_size, spatial_scale, backend)(input, rois)``.

    Args:
        output_size: int or (PH, PW), each >= 1.
        spatial_scale: finite and > 0.
        backend: "auto", a backend name, or a comma-separated list; names are checked here.

    Raises:
        TypeError, ValueError: a bad `output_size` or `spatial_scale`.
        BackendNotFoundError: an unknown backend name (with the closest known name).
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.output_size = normalize_output_size(output_size)
        self.spatial_scale = normalize_spatial_scale(spatial_scale)
        check_spec(backend)
        self.backend = backend

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        """(K, C, PH, PW) pooled features; see `roi_pool` (a tuple of tensors works too, except
        in TorchScript, which takes a list)."""
        return roi_pool(input, rois, self.output_size, self.spatial_scale, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"backend={self.backend!r}"
        )


def explain(
    input: Tensor,
    rois: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    *,
    backend: str = "auto",
) -> Explanation:
    """Which backend `roi_pool` would use for these arguments now, and why.

    Takes `roi_pool`'s arguments (nothing is computed). The result prints as a short report:
    the request in effect and where it came from, every backend with its reasons, how the
    gradient would be computed and how invalid ROIs would be caught. For a log of every choice
    as calls run, set ``ROI_OPS_LOG=debug`` (or configure the ``roi_ops.dispatch`` logger).

    Raises:
        TypeError, ValueError: bad arguments, as `roi_pool` raises them.
    """
    table, pooled_height, pooled_width, scale = _prepare(
        input, rois, output_size, spatial_scale, backend
    )
    needs_argmax = input.requires_grad and torch.is_grad_enabled()
    problem = RoIPoolProblem(input, table, pooled_height, pooled_width, scale, needs_argmax)
    return explain_problem(problem, backend)
