"""The user-facing `roi_pool` function and the `RoIPool` module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .autograd import eager_roi_pool, plain_eager
from .backend import RoIPoolProblem
from .dispatch import AUTO, Explanation, check_spec, explain_problem
from .ops import roi_pool_op
from .validation import (
    check_input,
    normalize_output_size,
    normalize_rois,
    normalize_spatial_scale,
)


def _prepare(input, rois, output_size, spatial_scale, backend):
    check_input(input)
    boxes = normalize_rois(rois, input)
    pooled_height, pooled_width = normalize_output_size(output_size)
    scale = normalize_spatial_scale(spatial_scale)
    if backend is not AUTO and not isinstance(backend, str):
        check_spec(backend)
    return boxes, pooled_height, pooled_width, scale


def roi_pool(
    input: Tensor,
    rois: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    *,
    backend: str = "auto",
) -> Tensor:
    """Region-of-interest max pooling (Fast R-CNN), exactly as docs/contract.md defines it.

    Args:
        input: (N, C, H, W) float16, bfloat16, float32 or float64 tensor, any strides.
        rois: (K, 5) tensor of (batch_index, x1, y1, x2, y2) rows in image pixels, or a list of
            at most N tensors of shape (L_i, 4) (x1, y1, x2, y2), entry i belonging to image i.
            Same dtype as `input`, or float32 when `input` is float16/bfloat16.
        output_size: PH = PW as an int, or (PH, PW); each >= 1.
        spatial_scale: factor from image pixels to feature-map cells (e.g. 1/16); finite, > 0.
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
    boxes, pooled_height, pooled_width, scale = _prepare(
        input, rois, output_size, spatial_scale, backend
    )
    needs_argmax = input.requires_grad and torch.is_grad_enabled()
    if plain_eager(input, boxes):
        return eager_roi_pool(
            input, boxes, pooled_height, pooled_width, scale, backend, needs_argmax
        )
    return roi_pool_op(input, boxes, pooled_height, pooled_width, scale, backend, needs_argmax)[0]


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
    boxes, pooled_height, pooled_width, scale = _prepare(
        input, rois, output_size, spatial_scale, backend
    )
    with torch.no_grad():
        return roi_pool_op(input, boxes, pooled_height, pooled_width, scale, backend, True)


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

    def forward(self, input: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        """(K, C, PH, PW) pooled features; see `roi_pool`."""
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
    boxes, pooled_height, pooled_width, scale = _prepare(
        input, rois, output_size, spatial_scale, backend
    )
    needs_argmax = input.requires_grad and torch.is_grad_enabled()
    problem = RoIPoolProblem(input, boxes, pooled_height, pooled_width, scale, needs_argmax)
    return explain_problem(problem, backend)
