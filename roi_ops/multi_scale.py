"""Multi-level (FPN) RoI max pooling in one call: `multi_scale_roi_pool` and `MultiScaleRoIPool`.

Each ROI is pooled from the pyramid level its size selects (torchvision's ``LevelMapper``,
`roi_ops.levels`), and the rows come back in the input order of the boxes. The level of every
ROI is computed on the device and never read on the host. A backend with a fused multi-level
kernel (``multi_scale_not_supported_reasons`` empty) pools every level in one launch per
direction; for any other backend roi_ops pools level by level through that backend's single-
level forward and backward (which needs each level's ROI count on the host: one device
synchronisation per level on CUDA).

As for `roi_pool`, the eager fast path (`MultiScaleFunction`) and the custom ops
``roi_ops::multi_scale_roi_pool`` / ``roi_ops::multi_scale_roi_pool_backward`` share one
forward and backward body and one saved state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import bad_rois, host_memory
from .autograd import plain_eager
from .backend import (
    Backend,
    MultiScaleRoIPoolBackwardProblem,
    MultiScaleRoIPoolProblem,
    RoIPoolBackwardProblem,
    RoIPoolProblem,
    batch_indices,
)
from .config import poisoning_enabled
from .dispatch import AUTO, BackendError, BackendUnavailableError, check_spec, resolve_backend
from .execute import (
    call_forward,
    finish_value_checks,
    owner_of,
    record_owner,
    start_value_checks,
)
from .layout import gradient_memory_format
from .levels import check_scales, infer_scales, level_range, roi_levels
from .scatter import gather_at_argmax, scatter_backward
from .validation import check_input, normalize_output_size, normalize_rois

# Bodies ------------------------------------------------------------------------------------


def _level_rows(levels: Tensor, level: int) -> Tensor:
    """(k,) int64 indices of the ROIs of `level` (reads the count: synchronises CUDA)."""
    return (levels == level).nonzero().squeeze(1)


def run_multi_forward(
    features: Sequence[Tensor],
    rois: Tensor,
    levels: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scales: Sequence[float],
    backend: str,
    needs_argmax: bool,
) -> tuple[Tensor, Tensor]:
    """(output (K, C, PH, PW), int32 argmax or an empty one) of one validated call."""
    first = features[0]
    device = first.device
    shape = (rois.shape[0], first.shape[1], pooled_height, pooled_width)
    argmax_shape = shape if needs_argmax else (0,)
    if device.type == "meta":
        output = torch.empty(shape, dtype=first.dtype, device=device)
        return output, torch.empty(argmax_shape, dtype=torch.int32, device=device)
    if device.type == "cuda":
        bad_rois.raise_pending(device)
    problem = MultiScaleRoIPoolProblem(
        features, rois, levels, pooled_height, pooled_width, spatial_scales, needs_argmax
    )
    chosen = resolve_backend(backend, problem.level(0))
    fused = not chosen.multi_scale_not_supported_reasons(problem)
    log = start_value_checks(fused and chosen.reports_bad_rois, rois, first.shape[0], device)
    if fused:
        problem.bad_roi_log = log
        output = host_memory.empty(shape, first.dtype, device)
        argmax = host_memory.empty(argmax_shape, torch.int32, device)
        if poisoning_enabled():
            output.fill_(float("nan"))
            argmax.fill_(-7)
        forward = chosen.forward_multi_scale
        call_forward(chosen, forward, problem, output, argmax if needs_argmax else None)
        if log is not None:
            finish_value_checks(log, device)
    else:
        output = torch.zeros(shape, dtype=first.dtype, device=device)
        argmax = torch.full(argmax_shape, -1, dtype=torch.int32, device=device)
        for level, feature in enumerate(features):
            rows = _level_rows(levels, level)
            if rows.numel() == 0:
                continue
            sub = RoIPoolProblem(
                feature,
                rois.index_select(0, rows),
                pooled_height,
                pooled_width,
                spatial_scales[level],
                needs_argmax,
            )
            reasons = chosen.not_supported_reasons(sub)
            if reasons:
                raise BackendUnavailableError(
                    f"backend: {chosen.name!r} cannot pool level {level} of this call "
                    f"({'; '.join(reasons)}); choose another backend"
                )
            level_output = torch.empty(sub.output_shape, dtype=first.dtype, device=device)
            level_argmax = torch.empty(
                sub.output_shape if needs_argmax else (0,), dtype=torch.int32, device=device
            )
            call_forward(
                chosen, chosen.forward, sub, level_output, level_argmax if needs_argmax else None
            )
            output.index_copy_(0, rows, level_output)
            if needs_argmax:
                argmax.index_copy_(0, rows, level_argmax)
    if needs_argmax:
        record_owner(argmax, (chosen, fused))
    return output, argmax


def _formats(channels_last: Sequence[bool]) -> tuple[torch.memory_format, ...]:
    return tuple(torch.channels_last if c else torch.contiguous_format for c in channels_last)


def _shared_scatter(problem: MultiScaleRoIPoolBackwardProblem) -> list[Tensor]:
    """roi_ops' deterministic scatter, level by level, without reading anything on the host."""
    grads = []
    levels = problem.levels[:, None, None, None]
    for level, shape in enumerate(problem.input_shapes):
        argmax = torch.where(levels == level, problem.argmax, -1)
        grads.append(
            scatter_backward(
                problem.grad_output,
                argmax,
                problem.batch_index,
                shape,
                problem.input_dtype,
                problem.memory_formats[level],
            )
        )
    return grads


def _backward_level_by_level(
    chosen: Backend, problem: MultiScaleRoIPoolBackwardProblem
) -> list[Tensor]:
    from .execute import backward_on

    grads = []
    for level, shape in enumerate(problem.input_shapes):
        rows = _level_rows(problem.levels, level)
        wanted = problem.memory_formats[level]
        asked = wanted if wanted in chosen.gradient_formats else torch.contiguous_format
        sub = RoIPoolBackwardProblem(
            problem.grad_output.index_select(0, rows),
            problem.argmax.index_select(0, rows),
            problem.rois.index_select(0, rows),
            shape,
            problem.input_dtype,
            asked,
            problem.deterministic,
        )
        grads.append(backward_on(chosen, sub, wanted))
    return grads


def run_multi_backward(
    grad_output: Tensor,
    rois: Tensor,
    levels: Tensor,
    argmax: Tensor,
    input_shapes: Sequence[tuple[int, int, int, int]],
    input_dtype: torch.dtype,
    channels_last: Sequence[bool],
    backend: str,
) -> list[Tensor]:
    """The L gradients (N, C, H_l, W_l) of `input_dtype`, each dense in channels_last where
    `channels_last` says so, from the forward's argmax; on the backend that ran the forward."""
    device = grad_output.device
    formats = _formats(channels_last)
    if device.type == "meta":
        return [
            torch.empty(shape, dtype=input_dtype, device=device, memory_format=fmt)
            for shape, fmt in zip(input_shapes, formats, strict=True)
        ]
    if device.type == "cuda":
        bad_rois.raise_pending(device)
    owner = owner_of(argmax)
    if isinstance(owner, tuple):
        chosen, fused = owner
    else:  # not recorded (the op called by hand): resolve as the forward would, loop
        stand_in = torch.empty((), dtype=input_dtype, device=device).expand(input_shapes[0])
        problem = RoIPoolProblem(stand_in, rois, argmax.shape[2], argmax.shape[3], 1.0, True)
        chosen, fused = resolve_backend(backend, problem), False
    deterministic = torch.are_deterministic_algorithms_enabled()
    problem = MultiScaleRoIPoolBackwardProblem(
        grad_output, argmax, rois, levels, input_shapes, input_dtype, formats, deterministic
    )
    if not fused:
        return _backward_level_by_level(chosen, problem)
    grads = None
    if chosen.deterministic_backward or not deterministic:
        try:
            grads = chosen.backward_multi_scale(problem)
        except Exception as error:
            raise BackendError(
                f"backend {chosen.name!r} failed in backward: {type(error).__name__}: {error}"
            ) from error
    if grads is None:
        return _shared_scatter(problem)
    return [grad.contiguous(memory_format=fmt) for grad, fmt in zip(grads, formats, strict=True)]


# Custom ops ---------------------------------------------------------------------------------


@torch.library.custom_op("roi_ops::multi_scale_roi_pool", mutates_args=())
def multi_scale_roi_pool_op(
    features: list[Tensor],
    rois: Tensor,
    levels: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scales: list[float],
    backend: str,
    needs_argmax: bool,
) -> tuple[Tensor, Tensor]:
    """(output, argmax) of validated arguments; argmax is empty when not `needs_argmax`."""
    return run_multi_forward(
        features, rois, levels, pooled_height, pooled_width, spatial_scales, backend, needs_argmax
    )


@multi_scale_roi_pool_op.register_fake
def _multi_fake(features, rois, levels, pooled_height, pooled_width, scales, backend, needs):
    shape = (rois.shape[0], features[0].shape[1], pooled_height, pooled_width)
    output = features[0].new_empty(shape)
    return output, features[0].new_empty(shape if needs else (0,), dtype=torch.int32)


@torch.library.custom_op("roi_ops::multi_scale_roi_pool_backward", mutates_args=())
def multi_scale_roi_pool_backward_op(
    grad_output: Tensor,
    rois: Tensor,
    levels: Tensor,
    argmax: Tensor,
    shapes: list[int],
    input_dtype: torch.dtype,
    backend: str,
    channels_last: list[bool],
) -> list[Tensor]:
    """The L gradients; `shapes` holds the L (N, C, H, W) shapes one after another."""
    input_shapes = [tuple(shapes[i : i + 4]) for i in range(0, len(shapes), 4)]
    return run_multi_backward(
        grad_output, rois, levels, argmax, input_shapes, input_dtype, channels_last, backend
    )


@multi_scale_roi_pool_backward_op.register_fake
def _multi_backward_fake(grad_output, rois, levels, argmax, shapes, dtype, backend, last):
    return [
        torch.empty(
            shapes[4 * i : 4 * i + 4],
            dtype=dtype,
            device=grad_output.device,
            memory_format=torch.channels_last if c else torch.contiguous_format,
        )
        for i, c in enumerate(last)
    ]


def _backward_backward_setup(ctx, inputs, output) -> None:
    _, rois, levels, argmax, shapes, *_ = inputs
    ctx.num_images = shapes[0]
    ctx.save_for_backward(rois, levels, argmax)


def _backward_backward(ctx, grad_grads):
    rois, levels, argmax = ctx.saved_tensors
    batch_index = batch_indices(rois, ctx.num_images)
    total = None
    for level, grad_grad in enumerate(grad_grads):
        if grad_grad is None:
            continue
        level_argmax = torch.where(levels[:, None, None, None] == level, argmax, -1)
        gathered = gather_at_argmax(grad_grad, level_argmax, batch_index)
        total = gathered if total is None else total + gathered
    if total is None:
        total = torch.zeros(argmax.shape, dtype=grad_grads[0].dtype, device=argmax.device)
    return total, None, None, None, None, None, None, None


multi_scale_roi_pool_backward_op.register_autograd(
    _backward_backward, setup_context=_backward_backward_setup
)


# The one autograd definition -----------------------------------------------------------------


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    features, rois, levels, _, _, _, backend, needs_argmax = inputs
    ctx.shapes = [int(v) for f in features for v in f.shape]
    ctx.input_dtype = features[0].dtype
    ctx.channels_last = [gradient_memory_format(f) == torch.channels_last for f in features]
    ctx.backend = backend
    ctx.needs_argmax = needs_argmax
    if needs_argmax:
        ctx.save_for_backward(rois, levels, output[1])


def _gradients(ctx, grad_output: Tensor) -> list[Tensor]:
    if not ctx.needs_argmax:
        raise RuntimeError(
            "roi_ops.multi_scale_roi_pool ran without an argmax (no feature level required "
            "grad, or grad mode was off), so it cannot be differentiated"
        )
    rois, levels, argmax = ctx.saved_tensors
    arguments = (ctx.shapes, ctx.input_dtype, ctx.backend, ctx.channels_last)
    if torch.is_grad_enabled() or not getattr(ctx, "eager", False):
        return multi_scale_roi_pool_backward_op(grad_output, rois, levels, argmax, *arguments)
    shapes = [tuple(ctx.shapes[i : i + 4]) for i in range(0, len(ctx.shapes), 4)]
    return run_multi_backward(
        grad_output,
        rois,
        levels,
        argmax,
        shapes,
        ctx.input_dtype,
        ctx.channels_last,
        ctx.backend,
    )


def _op_backward(ctx, grad_output, _grad_argmax=None):
    return _gradients(ctx, grad_output), None, None, None, None, None, None, None


multi_scale_roi_pool_op.register_autograd(_op_backward, setup_context=_setup_context)


class MultiScaleFunction(torch.autograd.Function):
    """The eager fast path of a multi-level call that needs gradients."""

    @staticmethod
    def forward(ctx, rois, levels, pooled_height, pooled_width, scales, backend, *features):
        inputs = (features, rois, levels, pooled_height, pooled_width, scales, backend, True)
        output, argmax = run_multi_forward(*inputs)
        _setup_context(ctx, inputs, (output, argmax))
        ctx.eager = True
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return (None,) * 6 + tuple(_gradients(ctx, grad_output))


# Public API ---------------------------------------------------------------------------------


def _check_features(features: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)) or not features:
        raise TypeError(
            "features: expected a non-empty list of (N, C, H, W) tensors, one per pyramid "
            f"level, finest first, got {type(features).__name__}"
        )
    first = features[0]
    for level, feature in enumerate(features):
        try:
            check_input(feature)
        except (TypeError, ValueError) as error:
            raise type(error)(str(error).replace("input:", f"features[{level}]:", 1)) from None
        same = (
            feature.shape[:2] == first.shape[:2]
            and feature.dtype == first.dtype
            and feature.device == first.device
        )
        if not same:
            raise ValueError(
                f"features[{level}]: expected N={first.shape[0]}, C={first.shape[1]}, "
                f"{first.dtype} on {first.device} like features[0], got N={feature.shape[0]}, "
                f"C={feature.shape[1]}, {feature.dtype} on {feature.device}"
            )
    return list(features)


def multi_scale_roi_pool(
    features: Sequence[Tensor],
    rois: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scales: Sequence[float],
    *,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
    backend: str = "auto",
) -> Tensor:
    """RoI max pooling over a feature pyramid: each ROI from the level its size selects.

    The level of a box of area A is ``floor(canonical_level + log2(sqrt(A) / canonical_scale)
    + eps)``, clamped to the levels given (torchvision's ``LevelMapper``). Row k of the result is
    ``roi_pool(features[l_k], rois[k:k+1], output_size, spatial_scales[l_k])``, bit for bit; a
    box whose level is not a number (inverted along one axis) gives zeros, as torchvision's loop.

    Args:
        features: L tensors (N, C, H_l, W_l) of one dtype and device, finest level first.
        rois: (K, 5) rows (batch_index, x1, y1, x2, y2) in image pixels, or a list of at most N
            (L_i, 4) tensors, as for `roi_pool`.
        output_size: int or (PH, PW), each >= 1.
        spatial_scales: L scales, finest first, of consecutive pyramid levels (e.g. 1/4, 1/8,
            1/16, 1/32); `MultiScaleRoIPool` infers them from the image sizes.
        canonical_scale: the level mapping's canonical box side (224 pixels).
        canonical_level: the level of a box of that side (4).
        eps: added before the floor (1e-6).
        backend: as for `roi_pool`.

    Returns:
        (K, C, PH, PW) contiguous tensor of the features' dtype, rows in the order of the boxes.

    Raises:
        TypeError, ValueError: bad arguments, naming the argument; invalid ROI rows while value
            checks are on (as `roi_pool` raises them).
        BackendNotFoundError, BackendUnavailableError: as `roi_pool`.
    """
    features = _check_features(features)
    scales = check_scales(spatial_scales, len(features))
    boxes = normalize_rois(rois, features[0])
    pooled_height, pooled_width = normalize_output_size(output_size)
    if not isinstance(backend, str):
        check_spec(backend)
    if len(features) == 1:
        from .functional import roi_pool

        return roi_pool(
            features[0], boxes, (pooled_height, pooled_width), scales[0], backend=backend
        )
    k_min, k_max = level_range(scales)
    levels = roi_levels(boxes, k_min, k_max, canonical_scale, canonical_level, eps)
    needs_argmax = torch.is_grad_enabled() and any(f.requires_grad for f in features)
    arguments = (pooled_height, pooled_width, scales, backend)
    if plain_eager(boxes, *features):
        if needs_argmax:
            return MultiScaleFunction.apply(boxes, levels, *arguments, *features)
        return run_multi_forward(features, boxes, levels, *arguments, False)[0]
    return multi_scale_roi_pool_op(features, boxes, levels, *arguments, needs_argmax)[0]


class MultiScaleRoIPool(nn.Module):
    """Multi-level RoI max pooling with torchvision ``MultiScaleRoIAlign``'s interface.

    ``MultiScaleRoIPool(featmap_names, output_size)(x, boxes, image_shapes)`` pools each box
    from the level its size selects, among the feature maps of `x` named in `featmap_names`
    (finest first); the scales are inferred from the image sizes on the first call, as
    torchvision does.

    Args:
        featmap_names: names of the feature maps of `x` to pool from.
        output_size: int or (PH, PW).
        canonical_scale: the level mapping's canonical box side (224 pixels).
        canonical_level: the level of a box of that side (4).
        backend: as for `roi_pool`.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int],
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        backend: str = AUTO,
    ) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = normalize_output_size(output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        check_spec(backend)
        self.backend = backend
        self.scales: list[float] | None = None

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """(K, C, PH, PW) pooled features of the boxes of every image, in order.

        Args:
            x: feature maps by name (others than `featmap_names` are ignored).
            boxes: per image, an (L_i, 4) tensor of (x1, y1, x2, y2) in image pixels.
            image_shapes: per image, its (height, width) before the backbone.
        """
        features = [value for name, value in x.items() if name in self.featmap_names]
        if not features:
            raise ValueError(f"x: expected feature maps named {self.featmap_names}, got {list(x)}")
        if self.scales is None:
            self.scales = infer_scales(features, image_shapes)
        return multi_scale_roi_pool(
            features,
            boxes,
            self.output_size,
            self.scales,
            canonical_scale=self.canonical_scale,
            canonical_level=self.canonical_level,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"canonical_scale={self.canonical_scale}, canonical_level={self.canonical_level}"
        )
