"""What TorchScript compiles when it meets `roi_ops.roi_pool` (scripting and tracing).

`torch.jit.script` cannot compile `roi_ops.roi_pool` itself (its checks are Python), so the
function names this module's `roi_pool` as its scriptable form (``__prepare_scriptable__``, the
hook torchvision and torch.nn use): `torch.jit.script` of `roi_ops.roi_pool`, of
`roi_ops.RoIPool`, or of any code calling them compiles this instead. It takes the same arguments
(``boxes=`` included), checks them with the same rules, and calls ``roi_ops::roi_pool_jit``,
which decides at run time whether an argmax is needed (so one scripted graph serves inference
and training). Loading a saved script needs ``import roi_ops`` first, which registers
the op.

TorchScript reads the annotations as written (``BroadcastingList2`` is not a runtime type).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.jit.annotations import BroadcastingList2


def _float_dtype(dtype: int) -> bool:
    return (
        dtype == torch.float16
        or dtype == torch.bfloat16
        or dtype == torch.float32
        or dtype == torch.float64
    )


def _check_rois_dtype(rois: Tensor, input: Tensor, what: str) -> None:
    half = input.dtype == torch.float16 or input.dtype == torch.bfloat16
    if rois.dtype != input.dtype and not (half and rois.dtype == torch.float32):
        raise TypeError(
            f"{what}: expected dtype {input.dtype} (or float32 with a float16/bfloat16 input), "
            f"got {rois.dtype}; convert it with {what}.to(input.dtype)"
        )
    if rois.device != input.device:
        raise ValueError(
            f"{what}: expected a tensor on input's device {input.device}, got {rois.device}; "
            f"move it with {what}.to(input.device)"
        )


def _rois_table(rois: Tensor | list[Tensor], input: Tensor) -> Tensor:
    if isinstance(rois, Tensor):
        if rois.dim() != 2 or rois.size(1) != 5:
            raise ValueError(
                "rois: expected a (K, 5) tensor of (batch_index, x1, y1, x2, y2) rows or a list "
                f"of (L, 4) tensors, got a tensor of shape {rois.shape}"
            )
        _check_rois_dtype(rois, input, "rois")
        return rois
    if len(rois) > input.size(0):
        raise ValueError(
            f"rois: expected a list of at most N={input.size(0)} tensors (one per image), got "
            f"{len(rois)}"
        )
    rows: list[Tensor] = []
    for i, boxes in enumerate(rois):
        if boxes.dim() != 2 or boxes.size(1) != 4:
            raise ValueError(
                f"rois[{i}]: expected an (L, 4) tensor of (x1, y1, x2, y2), got shape {boxes.shape}"
            )
        _check_rois_dtype(boxes, input, f"rois[{i}]")
        index = torch.full_like(boxes[:, :1], float(i))
        rows.append(torch.cat([index, boxes], dim=1))
    if len(rows) == 0:
        return torch.empty((0, 5), dtype=input.dtype, device=input.device)
    return torch.cat(rows, dim=0)


def roi_pool(
    input: Tensor,
    rois: Tensor | list[Tensor] | None = None,
    output_size: Optional[BroadcastingList2[int]] = None,  # noqa: UP045  (TorchScript)
    spatial_scale: float = 1.0,
    boxes: Tensor | list[Tensor] | None = None,
    backend: str = "auto",
) -> Tensor:
    """`roi_ops.roi_pool` as TorchScript compiles it (same arguments, same checks; errors
    surface as ``torch.jit.Error`` naming the Python exception)."""
    if rois is None:
        if boxes is None:
            raise TypeError("roi_pool: missing the boxes; pass rois (or boxes=, as torchvision)")
        rois = boxes
    elif boxes is not None:
        raise TypeError("roi_pool: got both rois and boxes=; pass one of them")
    if output_size is None:
        raise TypeError("roi_pool: missing required argument output_size (an int or (PH, PW))")
    if input.dim() != 4:
        raise ValueError(f"input: expected a 4-D tensor (N, C, H, W), got shape {input.shape}")
    if not _float_dtype(input.dtype):
        raise TypeError(
            "input: expected dtype float16, bfloat16, float32 or float64, got "
            f"{input.dtype}; convert it with input.float()"
        )
    if input.size(2) * input.size(3) >= 2147483648:  # 2^31
        raise ValueError(
            f"input: expected H * W < 2^31 (the argmax is int32), got shape {input.shape}; pool "
            "a downsampled map or split it into tiles"
        )
    if len(output_size) != 2:
        raise TypeError(
            f"output_size: expected an int or a pair of ints (PH, PW), got {output_size}"
        )
    if output_size[0] < 1 or output_size[1] < 1:
        raise ValueError(f"output_size: expected each size >= 1, got {output_size}")
    if not (spatial_scale > 0.0 and math.isfinite(spatial_scale)):
        raise ValueError(
            "spatial_scale: expected a finite number > 0 (e.g. 1 / 16 for a stride-16 map), got "
            f"{spatial_scale}"
        )
    table = _rois_table(rois, input)
    # roi_pool_jit decides at run time whether an argmax is needed: a script run without grad
    # still trains.
    return torch.ops.roi_ops.roi_pool_jit(
        input, table, output_size[0], output_size[1], spatial_scale, backend
    )
