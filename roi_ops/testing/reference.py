"""The scalar reference: roi_pool written as plain loops over docs/contract.md.

Slow and deliberately naive. It shares no code with any backend: geometry uses NumPy scalars of
the geometry dtype (each operation rounded to that type) and exact rationals for C rounding.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

INDEX_LIMIT = 2**40

_GEOMETRY_NUMPY_TYPE = {
    torch.float16: np.float16,
    torch.bfloat16: np.float32,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


def c_round(value: np.floating) -> np.floating:
    """C `round`: to the nearest integer, halves away from zero; NaN and infinities unchanged."""
    if not math.isfinite(float(value)):
        return value
    exact = Fraction(float(value))
    magnitude = math.floor(abs(exact) + Fraction(1, 2))
    return type(value)(magnitude if exact >= 0 else -magnitude)


def to_index(value: np.floating) -> int:
    """The contract's `index(v)`: NaN -> 0, otherwise saturate to [-2^40, 2^40]."""
    as_float = float(value)
    if math.isnan(as_float):
        return 0
    if as_float >= INDEX_LIMIT:
        return INDEX_LIMIT
    if as_float <= -INDEX_LIMIT:
        return -INDEX_LIMIT
    return int(as_float)


def geometry_scale(spatial_scale: float, gtype: type) -> np.floating:
    """`G(spatial_scale)`: direct for float64, through float32 otherwise."""
    if gtype is np.float64:
        return np.float64(spatial_scale)
    return gtype(np.float32(spatial_scale))


def bin_edges(
    corner: int, roi_size: int, bins: int, limit: int, gtype: type
) -> list[tuple[int, int]]:
    """[(start, end)] of each bin along one axis, clamped to [0, limit]."""
    bin_size = gtype(roi_size) / gtype(bins)
    edges = []
    for p in range(bins):
        start = to_index(np.floor(gtype(p) * bin_size)) + corner
        end = to_index(np.ceil(gtype(p + 1) * bin_size)) + corner
        edges.append((min(max(start, 0), limit), min(max(end, 0), limit)))
    return edges


def roi_bins(
    row: list[float],
    num_images: int,
    height: int,
    width: int,
    pooled: tuple[int, int],
    spatial_scale: float,
    rois_dtype: torch.dtype,
) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]] | None:
    """(batch, row edges, column edges) of one ROI row, or None for an invalid ROI."""
    gtype = _GEOMETRY_NUMPY_TYPE[rois_dtype]
    values = [gtype(v) for v in row]
    if not all(math.isfinite(float(v)) for v in values):
        return None
    batch = math.trunc(float(values[0]))
    if not 0 <= batch < num_images:
        return None
    scale = geometry_scale(spatial_scale, gtype)
    x1, y1, x2, y2 = (to_index(c_round(v * scale)) for v in values[1:])
    roi_w = max(x2 - x1 + 1, 1)
    roi_h = max(y2 - y1 + 1, 1)
    rows = bin_edges(y1, roi_h, pooled[0], height, gtype)
    cols = bin_edges(x1, roi_w, pooled[1], width, gtype)
    return batch, rows, cols


def _is_greater(candidate: float, best: float) -> bool:
    """Contract order: NaN above everything; the first of equals stays."""
    if math.isnan(best):
        return False
    if math.isnan(candidate):
        return True
    return candidate > best


def reference_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """roi_pool by the contract, with scalar loops.

    Args:
        input: (N, C, H, W) float tensor.
        rois: (K, 5) tensor (batch_index, x1, y1, x2, y2), dtype as the contract allows.
        output_size: int or (PH, PW).
        spatial_scale: the coordinate scale.

    Returns:
        (output, argmax): (K, C, PH, PW) in ``input``'s dtype, and int32 of the same shape.
    """
    pooled = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    num_images, channels, height, width = input.shape
    planes = input.detach().cpu().to(torch.float64).numpy()
    rows_list = rois.detach().cpu().to(torch.float64).tolist()
    num_rois = len(rows_list)
    out = np.zeros((num_rois, channels, *pooled), dtype=np.float64)
    arg = np.full((num_rois, channels, *pooled), -1, dtype=np.int64)
    with np.errstate(all="ignore"):
        for k, row in enumerate(rows_list):
            bins = roi_bins(row, num_images, height, width, pooled, spatial_scale, rois.dtype)
            if bins is None:
                continue
            batch, row_edges, col_edges = bins
            for c in range(channels):
                plane = planes[batch, c]
                for ph, (hs, he) in enumerate(row_edges):
                    for pw, (ws, we) in enumerate(col_edges):
                        best, best_index = 0.0, -1
                        for h in range(hs, he):
                            for w in range(ws, we):
                                value = float(plane[h, w])
                                if best_index == -1 or _is_greater(value, best):
                                    best, best_index = value, h * width + w
                        out[k, c, ph, pw] = best
                        arg[k, c, ph, pw] = best_index
    output = torch.from_numpy(out).to(input.dtype)
    argmax = torch.from_numpy(arg).to(torch.int32)
    return output, argmax


def reference_roi_pool_backward(
    grad_output: torch.Tensor, argmax: torch.Tensor, rois: torch.Tensor, input_shape
) -> torch.Tensor:
    """grad_input in float64 by scattering `grad_output` at `argmax`, one element at a time."""
    num_images, channels, height, width = input_shape
    grad = np.zeros((num_images, channels, height * width), dtype=np.float64)
    go = grad_output.detach().cpu().to(torch.float64).numpy()
    am = argmax.cpu().numpy()
    rows = rois.detach().cpu().to(torch.float64).tolist()
    for k, c, ph, pw in np.ndindex(*am.shape):
        index = am[k, c, ph, pw]
        if index >= 0:  # only valid ROIs have an argmax, so the batch index is finite
            grad[math.trunc(rows[k][0]), c, index] += go[k, c, ph, pw]
    return torch.from_numpy(grad.reshape(num_images, channels, height, width))


def backward_error_bound(
    grad_output: torch.Tensor,
    argmax: torch.Tensor,
    rois: torch.Tensor,
    input_shape,
    accumulate_dtype: torch.dtype,
    result_dtype: torch.dtype,
) -> torch.Tensor:
    """Per-element float64 bound on |grad_input - exact| for a gradient summed in any order.

    Summing n terms in `accumulate_dtype` in any order errs by at most (n - 1) * eps * sum|terms|
    (Higham, recursive summation); rounding the sum once to `result_dtype` adds half an ulp of it
    and of the exact value, and a subnormal's absolute half-step. Shapes as in
    `reference_roi_pool_backward`; the bound has `input_shape` and dtype float64.
    """
    terms = reference_roi_pool_backward(torch.ones_like(grad_output), argmax, rois, input_shape)
    magnitude = reference_roi_pool_backward(grad_output.abs(), argmax, rois, input_shape)
    exact = reference_roi_pool_backward(grad_output, argmax, rois, input_shape).abs()
    summed = (terms - 1).clamp(min=0) * torch.finfo(accumulate_dtype).eps * magnitude
    if result_dtype == accumulate_dtype:
        return summed
    info = torch.finfo(result_dtype)
    rounding = info.eps * (exact + summed / 2) + info.smallest_normal * info.eps
    return summed + rounding
