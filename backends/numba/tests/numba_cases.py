"""Shared helpers of the numba backend's tests: backends to test, poisoned calls, inputs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from roi_ops.backend import RoIPoolProblem
from roi_ops.testing import check_with_and_without_argmax, poisoned_forward, reference_roi_pool

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last"]

# The serial kernels take every call below `serial_work`; these force one kind or the other.
SCHEDULES = {"serial": 2**62, "parallel": 0}


def make_backend(schedule: str = "serial", **tuning):
    """A NumbaBackend whose calls all run serially or all in parallel, with `tuning` changes."""
    from roi_ops_numba import NumbaBackend
    from roi_ops_numba.tuning import DEFAULT_TUNING

    backend = NumbaBackend(replace(DEFAULT_TUNING, serial_work=SCHEDULES[schedule], **tuning))
    reason = backend.check_available()
    if reason is not None:
        pytest.skip(f"numba backend unavailable: {reason}")
    return backend


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def run_forward(backend, x, rois, size, scale, needs_argmax=True, log=None):
    """Call the backend on outputs poisoned with NaN and -7."""
    problem = RoIPoolProblem(x, rois, size[0], size[1], scale, needs_argmax, log)
    return poisoned_forward(backend, problem)


def check(backend, x, rois, size, scale):
    """Forward with and without argmax against the reference; returns (output, argmax)."""
    size = (size, size) if isinstance(size, int) else size
    return check_with_and_without_argmax(
        lambda needs_argmax: run_forward(backend, x, rois, size, scale, needs_argmax),
        *reference_roi_pool(x, rois, size, scale),
    )


def random_features(shape, dtype, generator, ties: bool = False) -> torch.Tensor:
    if ties:
        values = torch.randint(-3, 4, shape, generator=generator).to(torch.float64)
    else:
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * 4
    values.view(-1)[0] = 1.5  # never all zero
    return values.to(dtype)


def random_rois(num_rois, num_images, height, width, scale, generator) -> torch.Tensor:
    """Boxes in image pixels, some off the map, some inverted; batch indices all valid."""
    batch = torch.randint(0, num_images, (num_rois, 1), generator=generator).to(torch.float64)
    lo = torch.tensor([-3.0, -3.0]) / scale
    hi = torch.tensor([width + 3.0, height + 3.0]) / scale
    p1 = lo + torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * (hi - lo)
    p2 = lo + torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * (hi - lo)
    return torch.cat([batch, p1, p2], dim=1)
