"""Shared helpers of the Triton backend's tests: devices, poisoned calls, checks against the
reference (bit comparisons: `roi_ops.testing.assert_same_bits`)."""

from __future__ import annotations

import math

import pytest
import torch

from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem
from roi_ops.testing import check_with_and_without_argmax, poisoned_forward, reference_roi_pool
from roi_ops_triton.backend import TritonBackend
from roi_ops_triton.interpreter import interpreting
from roi_ops_triton.tuning import DEFAULT_TUNING, Tuning

CUDA = torch.cuda.is_available()
INTERPRET = interpreting()
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = ["float16", "bfloat16", "float32", "float64"]
LAYOUTS = ["contiguous", "channels_last"]
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# CPU tensors run under the interpreter; CUDA tensors run the compiled kernels (or, with
# TRITON_INTERPRET=1 on a GPU machine, the interpreter too).
DEVICES = (["cpu"] if INTERPRET else []) + (
    [pytest.param("cuda", marks=pytest.mark.gpu)] if CUDA else []
)
COMPILED = pytest.mark.skipif(not CUDA or INTERPRET, reason="needs compiled kernels on CUDA")


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """`x` dense in `layout` ("contiguous" or "channels_last")."""
    return x.contiguous(memory_format=MEMORY_FORMATS[layout])


def rois_dtype(dtype: torch.dtype) -> torch.dtype:
    """The rois dtype that goes with an input dtype (float32 for bfloat16)."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def run_forward(
    x: torch.Tensor,
    rois: torch.Tensor,
    size: tuple[int, int],
    scale: float,
    needs_argmax: bool = True,
    tuning: Tuning = DEFAULT_TUNING,
    log: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call the backend directly, on outputs poisoned with NaN and -7."""
    problem = RoIPoolProblem(x, rois, size[0], size[1], scale, needs_argmax, log)
    backend = TritonBackend(tuning)
    assert backend.check_available() is None
    assert backend.not_supported_reasons(problem) == []
    return poisoned_forward(backend, problem)


def run_backward(*problem: object, tuning: Tuning = DEFAULT_TUNING) -> torch.Tensor:
    """The backend's backward of ``RoIPoolBackwardProblem(*problem)``."""
    return TritonBackend(tuning).backward(RoIPoolBackwardProblem(*problem))


def check(
    x: torch.Tensor,
    rois: torch.Tensor,
    size: int | tuple[int, int],
    scale: float,
    tuning: Tuning = DEFAULT_TUNING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compare training (with argmax) and inference forwards with the reference; returns the
    reference's (output, argmax)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    expected, expected_argmax = reference_roi_pool(x, rois, size, scale)
    check_with_and_without_argmax(
        lambda needs_argmax: run_forward(x, rois, size, scale, needs_argmax, tuning),
        expected,
        expected_argmax,
    )
    return expected, expected_argmax


def embedded(x: torch.Tensor, layout: str) -> torch.Tensor:
    """`x` as a view inside a NaN-filled buffer: a read past any edge would show up as NaN."""
    n, c, h, w = x.shape
    if layout == "channels_last":
        buffer = torch.full((n + 2, h + 2, w + 2, c + 2), math.nan, dtype=x.dtype, device=x.device)
        view = buffer[1 : n + 1, 1 : h + 1, 1 : w + 1, 1 : c + 1].permute(0, 3, 1, 2)
    else:
        buffer = torch.full((n + 2, c + 2, h + 2, w + 2), math.nan, dtype=x.dtype, device=x.device)
        view = buffer[1 : n + 1, 1 : c + 1, 1 : h + 1, 1 : w + 1]
    view.copy_(x)
    return view
