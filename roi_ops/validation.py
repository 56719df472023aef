"""Argument checks of docs/contract.md ("Bad input"). Every error names the argument, what was
expected and what was given."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_PLANE = 2**31


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_input(input: torch.Tensor) -> None:
    """Raise unless `input` is a 4-D float tensor whose planes fit an int32 argmax."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if input.layout != torch.strided:
        raise TypeError(f"input: expected a dense (strided) tensor, got layout {input.layout}")
    if input.dim() != 4:
        raise ValueError(
            f"input: expected a 4-D tensor (N, C, H, W), got {input.dim()}-D with shape "
            f"{tuple(input.shape)}"
        )
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(
            "input: expected dtype float16, bfloat16, float32 or float64, got "
            f"{_dtype_name(input.dtype)}"
        )
    height, width = input.shape[2], input.shape[3]
    if height * width >= MAX_PLANE:
        raise ValueError(
            f"input: expected H * W < 2^31 (the argmax is int32), got H={height}, W={width}"
        )


def allowed_rois_dtypes(input_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The rois dtypes allowed with an input of `input_dtype`."""
    if input_dtype in (torch.float16, torch.bfloat16):
        return (input_dtype, torch.float32)
    return (input_dtype,)


def _check_rois_tensor(rois: torch.Tensor, input: torch.Tensor, what: str) -> None:
    if rois.layout != torch.strided:
        raise TypeError(f"{what}: expected a dense (strided) tensor, got layout {rois.layout}")
    if rois.device != input.device:
        raise ValueError(
            f"{what}: expected a tensor on input's device {input.device}, got {rois.device}"
        )
    allowed = allowed_rois_dtypes(input.dtype)
    if rois.dtype not in allowed:
        names = " or ".join(_dtype_name(d) for d in allowed)
        raise TypeError(
            f"{what}: expected dtype {names} (input is {_dtype_name(input.dtype)}), got "
            f"{_dtype_name(rois.dtype)}"
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
        device or list length.
    """
    if isinstance(rois, torch.Tensor):
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(
                "rois: expected a (K, 5) tensor of (batch_index, x1, y1, x2, y2) rows or a list "
                f"of (L, 4) tensors, got a tensor of shape {tuple(rois.shape)}"
            )
        _check_rois_tensor(rois, input, "rois")
        return rois
    if not isinstance(rois, (list, tuple)):
        raise TypeError(
            "rois: expected a (K, 5) tensor or a list/tuple of (L, 4) tensors, got "
            f"{type(rois).__name__}"
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
            raise TypeError(f"{what}: expected an (L, 4) tensor, got {type(boxes).__name__}")
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
        raise TypeError(f"rois: expected every list entry to have one dtype, got {names}")
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
        raise TypeError(f"output_size: expected an int or a pair of ints, got {output_size!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"output_size: expected each size >= 1, got {output_size!r}")
    return int(pair[0]), int(pair[1])


def normalize_spatial_scale(spatial_scale: float) -> float:
    """Return `spatial_scale` as a float; it must be finite and > 0."""
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, Real):
        raise TypeError(
            f"spatial_scale: expected a real number, got {type(spatial_scale).__name__}"
        )
    value = float(spatial_scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"spatial_scale: expected a finite number > 0, got {spatial_scale!r}")
    return value


def check_backend_argument(backend: str) -> None:
    """Raise unless `backend` is a string."""
    if not isinstance(backend, str):
        raise TypeError(
            f"backend: expected a backend name or 'auto' as a string, got {type(backend).__name__}"
        )


def check_roi_values(rois: torch.Tensor, num_images: int) -> None:
    """Raise naming the first row whose batch index is outside [0, N) or that is not finite.

    Reads the values (one device synchronisation on CUDA).
    """
    if rois.shape[0] == 0:
        return
    finite = torch.isfinite(rois).all(dim=1)
    batch = torch.trunc(rois[:, 0])
    good = finite & (batch >= 0) & (batch < num_images)
    if bool(good.all()):
        return
    row = int((~good).nonzero()[0, 0])
    values = rois[row].tolist()
    if not bool(finite[row]):
        raise ValueError(
            f"rois: expected finite values, got row {row} = {values} (turn value checks off with "
            "roi_ops.set_value_checks(False) to get zeros for such rows instead)"
        )
    raise ValueError(
        f"rois: expected batch indices in [0, {num_images}) (N={num_images}), got "
        f"{values[0]!r} in row {row} = {values}"
    )
