"""Small input builders and stand-ins shared by the core's tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import roi_ops

# A "device" parameter: the CPU always; CUDA marked gpu and skipped without a device.
CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)
CPU_AND_CUDA = ["cpu", CUDA]


def small_inputs(dtype=torch.float64, k=6, seed=0):
    """(x (2, 3, 10, 12), rois (k, 5)): random features and valid boxes, alternating images."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64).to(dtype)
    boxes = torch.rand(k, 4, generator=g, dtype=torch.float64) * 10
    boxes[:, 2:] += boxes[:, :2]
    batch = torch.arange(k, dtype=torch.float64)[:, None] % 2
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    return x, torch.cat([batch, boxes], dim=1).to(rois_dtype)


class TorchKernels(roi_ops.Backend):
    """A float64 CPU backend that runs the torch backend's kernels under another name, for tests
    of how backends are chosen: subclasses give it a `name` (and a `priority`)."""

    device_types = frozenset({"cpu"})
    dtypes = frozenset({torch.float64})

    def forward(self, problem, output, argmax):
        from roi_ops.torch_backend import TorchBackend

        TorchBackend().forward(problem, output, argmax)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside the block, False again after it."""
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


_BUILT_ATTACH = []


def native_attach():
    """The C++ autograd node's attach, built (or loaded from torch's cache) on first use; fails
    the test when the build fails on a machine with a C++ compiler, skips it without one.
    roi_ops.native.attach itself is left None, so tests that do not choose a path keep to the
    Python Function whatever ran before them."""
    import shutil

    import roi_ops.native

    if not _BUILT_ATTACH:
        if not roi_ops.native.build():
            if shutil.which("c++") is None and shutil.which("g++") is None:
                pytest.skip(f"no C++ compiler here: {roi_ops.native.status()}")
            pytest.fail(f"roi_ops.native did not build: {roi_ops.native.status()}")
        _BUILT_ATTACH.append(roi_ops.native.attach)
        roi_ops.native.attach = None
    return _BUILT_ATTACH[0]
