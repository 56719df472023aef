"""ONNX export of models that call `roi_ops.roi_pool`, through the ONNX `MaxRoiPool` operator.

Both of torch's exporters translate roi_pool with no extra arguments, and roi_ops registers the
translations itself, when they can be needed: the TorchScript-based exporter's symbolic
(`torch.onnx.export(..., dynamo=False)`, registered with `torch.onnx.register_custom_op_symbolic`
as torchvision registers its own) when roi_ops first appears in a traced or scripted graph, and
both when an export runs. The dynamo exporter (the default) copies its tables from torch's
torchlib registry when an export starts, so roi_ops adds the translation there and, for the
export already running, to that export's registry (`register_in_running_export`). `register`
does all of it at once (needed only to export an ExportedProgram made before); `export` passes
the translation explicitly.

`MaxRoiPool` (opset 1 onwards; onnxruntime implements it for float32) computes the same function
as roi_ops on float32 inputs whose bins hold finite values. It differs on two corners, where the
exported model follows ONNX, not docs/contract.md:

- NaN features: roi_ops returns NaN for a bin holding a NaN; onnxruntime skips NaN.
- a bin holding only -inf: roi_ops returns -inf; onnxruntime returns -3.4028235e38 (-FLT_MAX).

Other dtypes have no exact ONNX equivalent, so exporting them raises `RoiPoolExportError`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

logger = logging.getLogger(__name__)

# The lowest opset the TorchScript-based exporter supports; MaxRoiPool exists since opset 1.
_TORCHSCRIPT_OPSET = 7
_registered: set[str] = set()

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
    # The argmax only feeds a backward, which an exported inference graph does not hold.
    output = op.MaxRoiPool(
        input, rois, pooled_shape=[pooled_height, pooled_width], spatial_scale=spatial_scale
    )
    no_argmax = op.Constant(value=onnxscript.ir.tensor(np.zeros((0,), dtype=np.int32)))
    return output, no_argmax


def _max_roi_pool(g, input, rois, pooled_height, pooled_width, spatial_scale):
    from torch.onnx import symbolic_helper

    for value, what in ((input, "input"), (rois, "rois")):
        dtype = value.type().scalarType() if value.type().kind() == "TensorType" else None
        if dtype is not None and dtype != "Float":
            raise RoiPoolExportError(
                f"{what}: ONNX MaxRoiPool needs {_SUPPORTED}, got {dtype}; export a float32 "
                "model or cast around roi_pool"
            )
    height = symbolic_helper._get_const(pooled_height, "i", "pooled_height")
    width = symbolic_helper._get_const(pooled_width, "i", "pooled_width")
    scale = symbolic_helper._get_const(spatial_scale, "f", "spatial_scale")
    return g.op("MaxRoiPool", input, rois, pooled_shape_i=[height, width], spatial_scale_f=scale)


def _roi_pool_symbolic(g, input, rois, pooled_height, pooled_width, spatial_scale, *_):
    output = _max_roi_pool(g, input, rois, pooled_height, pooled_width, spatial_scale)
    return output, None  # no argmax in ONNX; an exported inference graph does not use it


def _roi_pool_jit_symbolic(g, input, rois, pooled_height, pooled_width, spatial_scale, _):
    return _max_roi_pool(g, input, rois, pooled_height, pooled_width, spatial_scale)


def _register_torchscript_symbolic() -> None:
    # roi_pool_jit is what traced and scripted graphs hold; roi_pool what an export's own trace
    # records.
    for name, symbolic in (
        ("roi_ops::roi_pool", _roi_pool_symbolic),
        ("roi_ops::roi_pool_jit", _roi_pool_jit_symbolic),
    ):
        torch.onnx.register_custom_op_symbolic(name, symbolic, _TORCHSCRIPT_OPSET)


def _register_dynamo_translation() -> None:
    # The registry that torch.onnx.export(dynamo=True) copies its tables from (torch 2.9 to 2.14
    # at least). Private: if it moves, the dynamo exporter needs `export` or
    # `onnx_translation_table`, and `python -m pytest tests/test_onnx.py` says so.
    from torch.onnx._internal.exporter import _registration
    from torch.onnx._internal.exporter._torchlib import _torchlib_registry

    target = torch.ops.roi_ops.roi_pool.default
    entries = _torchlib_registry._registry
    if not any(entry.fx_target is target for entry in entries):
        entries.append(
            _registration.OnnxDecompMeta(
                onnx_function=_roi_pool_to_onnx, fx_target=target, signature=None, is_custom=True
            )
        )


def register_in_running_export() -> bool:
    """Add the translation to the registry of a dynamo export that is running now.

    torch.onnx.export(dynamo=True) builds its registry before it traces the model, so what
    `register` adds is seen from the next export on. roi_ops calls this while the export traces
    a roi_pool call: it finds the running export's registry on the call stack. Returns whether
    a registry was found.
    """
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:
        return False
    target = torch.ops.roi_ops.roi_pool.default
    frame = sys._getframe(1)
    found = False
    while frame is not None:
        registry = frame.f_locals.get("registry")
        if isinstance(registry, ONNXRegistry):
            found = True
            if not registry.is_registered(target):
                registry.register_op(target, _roi_pool_to_onnx)
        frame = frame.f_back
    return found


def register_torchscript() -> bool:
    """Register the TorchScript-based exporter's symbolic (idempotent); whether it is in place."""
    return register(("torchscript",))["torchscript"]


def register(exporters: tuple[str, ...] = ("torchscript", "dynamo")) -> dict[str, bool]:
    """Make `torch.onnx.export` translate roi_pool to MaxRoiPool with no extra arguments.

    Registers a TorchScript symbolic (for ``dynamo=False``) and the dynamo exporter's
    translation (needs onnxscript). Idempotent, and cheap after the first call. roi_ops calls it
    itself when an export runs; call it yourself before exporting an ExportedProgram that was
    made earlier with torch.export.

    Returns:
        {"torchscript": registered, "dynamo": registered}; False where that exporter is missing
        (then the dynamo exporter still works through `export`).
    """
    steps = {"torchscript": _register_torchscript_symbolic, "dynamo": _register_dynamo_translation}
    for name in exporters:
        step = steps[name]
        if name in _registered:
            continue
        try:
            step()
        except Exception as error:  # an exporter this torch or environment does not have
            logger.debug("roi_ops.onnx: %s exporter not registered: %s", name, error)
            continue
        _registered.add(name)
    return {name: name in _registered for name in ("torchscript", "dynamo")}


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
        RoiPoolExportError: the model pools a non-float32 tensor.
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
