"""Argument checks of docs/contract.md ("Bad input"). Every error names the argument, what was
expected and what was given, and says what to do."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch

from .bad_rois import BadRoi, error_message, invalid_rows

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_SET = frozenset(FLOAT_DTYPES)
_HALF = (torch.float16, torch.bfloat16)
MAX_PLANE = 2**31


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_input(input: torch.Tensor) -> None:
    """Raise unless `input` is a dense 4-D float tensor whose planes fit an int32 argmax."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(
            f"input: expected a torch.Tensor of shape (N, C, H, W), got {type(input).__name__}; "
            "convert it with torch.as_tensor(input)"
        )
    if input.layout != torch.strided:
        raise TypeError(
            f"input: expected a dense (strided) tensor, got layout {input.layout}; convert it "
            "with input.to_dense()"
        )
    if input.dim() != 4:
        hint = "; add the batch dimension with input.unsqueeze(0)" if input.dim() == 3 else ""
        raise ValueError(
            f"input: expected a 4-D tensor (N, C, H, W), got {input.dim()}-D with shape "
            f"{tuple(input.shape)}{hint}"
        )
    if input.dtype not in _FLOAT_SET:
        raise TypeError(
            "input: expected dtype float16, bfloat16, float32 or float64, got "
            f"{_dtype_name(input.dtype)}; convert it with input.float()"
        )
    shape = input.shape
    if shape[2] * shape[3] >= MAX_PLANE:
        raise ValueError(
            f"input: expected H * W < 2^31 (the argmax is int32), got H={shape[2]}, "
            f"W={shape[3]}; pool a downsampled map or split it into tiles"
        )


def allowed_rois_dtypes(input_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The rois dtypes allowed with an input of `input_dtype`."""
    if input_dtype in _HALF:
        return (input_dtype, torch.float32)
    return (input_dtype,)


def _check_rois_tensor(rois: torch.Tensor, input: torch.Tensor, what: str) -> None:
    if rois.device != input.device:
        raise ValueError(
            f"{what}: expected a tensor on input's device {input.device}, got {rois.device}; "
            f"move it with {what}.to(input.device)"
        )
    if rois.dtype != input.dtype and rois.dtype not in allowed_rois_dtypes(input.dtype):
        names = " or ".join(_dtype_name(d) for d in allowed_rois_dtypes(input.dtype))
        raise TypeError(
            f"{what}: expected dtype {names} (input is {_dtype_name(input.dtype)}), got "
            f"{_dtype_name(rois.dtype)}; convert it with {what}.to(input.dtype)"
        )
    if rois.layout != torch.strided:
        raise TypeError(
            f"{what}: expected a dense (strided) tensor, got layout {rois.layout}; convert it "
            f"with {what}.to_dense()"
        )


def _looks_like_rows(rois: Sequence) -> bool:
    return len(rois) > 0 and all(
        isinstance(row, (list, tuple)) and all(isinstance(v, Real) for v in row) for row in rois
    )


def normalize_rois(
    rois: torch.Tensor | Sequence[torch.Tensor], input: torch.Tensor
) -> torch.Tensor:
    """Check `rois` and return it as a (K, 5) tensor (batch_index, x1, y1, x2, y2).

    Args:
        rois: a (K, 5) tensor, or a list/tuple of at most N tensors of shape (L_i, 4).
        input: the (N, C, H, W) input, already checked.

    Raises:
        TypeError / ValueError naming `rois` (or `rois[i]`) for a wrong type, shape, dtype,
        device or list length, with what to do.
    """
    if isinstance(rois, torch.Tensor):
        shape = rois.shape
        if len(shape) != 2 or shape[1] != 5:
            hint = ""
            if len(shape) == 2 and shape[1] == 4:
                hint = (
                    "; (K, 4) boxes need their image: pass a list with one (L, 4) tensor per "
                    "image, or prepend the batch index column"
                )
            raise ValueError(
                "rois: expected a (K, 5) tensor of (batch_index, x1, y1, x2, y2) rows or a list "
                f"of (L, 4) tensors, got a tensor of shape {tuple(shape)}{hint}"
            )
        _check_rois_tensor(rois, input, "rois")
        return rois
    if not isinstance(rois, (list, tuple)):
        raise TypeError(
            "rois: expected a (K, 5) tensor or a list/tuple of (L, 4) tensors, got "
            f"{type(rois).__name__}"
        )
    if _looks_like_rows(rois):
        raise TypeError(
            "rois: expected a (K, 5) tensor or a list of (L, 4) tensors, got a list of "
            f"{type(rois[0]).__name__}s of numbers; build a tensor first: "
            "torch.tensor(rois, dtype=input.dtype, device=input.device)"
        )
    num_images = input.shape[0]
    if len(rois) > num_images:
        raise ValueError(
            f"rois: expected a list of at most N={num_images} tensors (one per image), got "
            f"{len(rois)}"
        )
    rows = []
    for i, boxes in enumerate(rois):
        what = f"rois[{i}]"
        if not isinstance(boxes, torch.Tensor):
            raise TypeError(
                f"{what}: expected an (L, 4) tensor, got {type(boxes).__name__}; build it with "
                "torch.tensor(boxes, dtype=input.dtype, device=input.device)"
            )
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"{what}: expected an (L, 4) tensor of (x1, y1, x2, y2), got shape "
                f"{tuple(boxes.shape)}"
            )
        _check_rois_tensor(boxes, input, what)
        index = torch.full((boxes.shape[0], 1), i, dtype=boxes.dtype, device=boxes.device)
        rows.append(torch.cat([index, boxes], dim=1))
    if not rows:
        return input.new_empty((0, 5))
    dtypes = {r.dtype for r in rows}
    if len(dtypes) > 1:
        names = ", ".join(sorted(_dtype_name(d) for d in dtypes))
        raise TypeError(
            f"rois: expected every list entry to have one dtype, got {names}; convert them "
            "with [b.to(input.dtype) for b in rois]"
        )
    return torch.cat(rows, dim=0)


def _is_integer(value: object) -> bool:
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def normalize_output_size(output_size: int | Sequence[int]) -> tuple[int, int]:
    """Return (PH, PW) from an int or a pair, each at least 1."""
    if _is_integer(output_size):
        pair = (output_size, output_size)
    elif (
        isinstance(output_size, (list, tuple))
        and len(output_size) == 2
        and all(_is_integer(v) for v in output_size)
    ):
        pair = tuple(output_size)
    else:
        raise TypeError(
            f"output_size: expected an int or a pair of ints (PH, PW), got {output_size!r}"
        )
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"output_size: expected each size >= 1, got {output_size!r}")
    return int(pair[0]), int(pair[1])


def normalize_spatial_scale(spatial_scale: float) -> float:
    """Return `spatial_scale` as a float; it must be finite and > 0."""
    if type(spatial_scale) is float and 0.0 < spatial_scale < math.inf:
        return spatial_scale
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, Real):
        raise TypeError(
            f"spatial_scale: expected a real number (e.g. 1 / 16 for a stride-16 map), got "
            f"{type(spatial_scale).__name__}"
        )
    value = float(spatial_scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"spatial_scale: expected a finite number > 0 (e.g. 1 / 16 for a stride-16 map), "
            f"got {spatial_scale!r}"
        )
    return value


def _first_bad_row(rois: torch.Tensor, invalid: torch.Tensor, num_images: int) -> BadRoi:
    row = int(invalid.nonzero()[0, 0])
    values = tuple(float(v) for v in rois[row].tolist())
    return BadRoi(row, values, num_images)


def check_roi_values(rois: torch.Tensor, num_images: int) -> None:
    """Raise naming the first row whose batch index is outside [0, N) or that is not finite.

    Reads the values: one device synchronisation on CUDA (the "immediate" mode).
    """
    if rois.shape[0] == 0:
        return
    invalid = invalid_rows(rois, num_images)
    if bool(invalid.any()):
        raise ValueError(error_message(_first_bad_row(rois, invalid, num_images), "in this call"))


def check_roi_values_cpu(rois: torch.Tensor, num_images: int) -> None:
    """`check_roi_values` for CPU rois, through NumPy (a few microseconds for small K)."""
    count = rois.shape[0]
    if count == 0:
        return
    values = rois.detach()
    if values.dtype == torch.bfloat16:
        values = values.float()
    array = values.numpy()
    batch = np.trunc(array[:, 0])
    if np.isfinite(array).all() and batch.min() >= 0 and batch.max() < num_images:
        return
    check_roi_values(rois.detach(), num_images)
