"""ONNX export of models that call `roi_ops.roi_pool`, through the ONNX `MaxRoiPool` operator.

`MaxRoiPool` (opset 1 onwards; onnxruntime implements it for float32) computes the same function
as roi_ops on float32 inputs whose bins hold finite values. It differs on two corners, where the
exported model follows ONNX, not docs/contract.md:

- NaN features: roi_ops returns NaN for a bin holding a NaN; onnxruntime skips NaN.
- a bin holding only -inf: roi_ops returns -inf; onnxruntime returns -3.4028235e38 (-FLT_MAX).

Other dtypes have no exact ONNX equivalent, so exporting them raises `RoiPoolExportError`.
"""

from __future__ import annotations

from typing import Any

import torch

_SUPPORTED = "float32 input and float32 rois"


class RoiPoolExportError(RuntimeError):
    """roi_pool cannot be expressed exactly in ONNX for these arguments."""


def _float32_only(value: Any, what: str) -> None:
    import onnxscript

    dtype = getattr(value, "dtype", None)
    if dtype is not None and dtype != onnxscript.ir.DataType.FLOAT:
        raise RoiPoolExportError(
            f"{what}: ONNX MaxRoiPool needs {_SUPPORTED}, got {dtype}; export a float32 model or "
            "cast around roi_pool"
        )


def _roi_pool_to_onnx(
    input,
    rois,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    backend: str,
    needs_argmax: bool,
):
    import numpy as np
    import onnxscript
    from onnxscript import opset18 as op

    _float32_only(input, "input")
    _float32_only(rois, "rois")
    if needs_argmax:
        raise RoiPoolExportError(
            "roi_pool: ONNX MaxRoiPool has no argmax; export the model in inference mode "
            "(torch.no_grad() or inputs that do not require grad)"
        )
    output = op.MaxRoiPool(
        input, rois, pooled_shape=[pooled_height, pooled_width], spatial_scale=spatial_scale
    )
    no_argmax = op.Constant(value=onnxscript.ir.tensor(np.zeros((0,), dtype=np.int32)))
    return output, no_argmax


def onnx_translation_table() -> dict:
    """``custom_translation_table`` entries for ``torch.onnx.export(..., dynamo=True)``."""
    return {torch.ops.roi_ops.roi_pool.default: _roi_pool_to_onnx}


def export(model: torch.nn.Module, args: tuple, f: str | None = None, **kwargs: Any) -> Any:
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with roi_pool translated.

    Args:
        model: a module whose forward calls `roi_ops.roi_pool` (or `RoIPool`).
        args: example inputs.
        f: optional path to write the ``.onnx`` file to.
        **kwargs: passed to `torch.onnx.export` (``dynamic_shapes``, ``input_names``...); a
            ``custom_translation_table`` given here is merged with roi_ops' entries.

    Returns:
        torch.onnx.ONNXProgram: the exported program.

    Raises:
        RoiPoolExportError: the model pools a non-float32 tensor, or needs the argmax.
    """
    table = {**onnx_translation_table(), **kwargs.pop("custom_translation_table", {})}
    try:
        with torch.no_grad():
            return torch.onnx.export(
                model, args, f, dynamo=True, custom_translation_table=table, **kwargs
            )
    except Exception as error:
        cause = error
        while cause is not None and not isinstance(cause, RoiPoolExportError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise RoiPoolExportError(str(cause)) from error
