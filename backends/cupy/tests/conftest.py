"""Fixtures of the CuPy backend's tests: the CPU emulator of its kernels, and a runner that is
the emulator without a GPU and CuPy on a CUDA device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The kernels compiled as host C++ (tools/host_emulator.cpp), built once per session."""
    pytest.importorskip("roi_ops_cupy")
    import emulator as harness

    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the host emulator")
    return harness.build(tmp_path_factory.mktemp("cupy-emulator"))


@pytest.fixture(scope="session", params=["emulator", "cuda"])
def runner(request):
    """Where launch plans run: the emulator (without a usable CUDA device) or CuPy."""
    from cupy_harness import CudaRunner

    from roi_ops_cupy.backend import CupyBackend

    reason = CupyBackend().check_available()
    if request.param == "emulator":
        if reason is None:
            pytest.skip("the kernels run on the CUDA device here (the emulator stands in for it)")
        return request.getfixturevalue("emulator")
    if reason is not None:
        pytest.skip(f"cupy backend unavailable: {reason}")
    return CudaRunner()


@pytest.fixture(scope="module")
def cuda_backend():
    """A CupyBackend on the CUDA device (the test is skipped where it is unavailable)."""
    from roi_ops_cupy.backend import CupyBackend

    backend = CupyBackend()
    reason = backend.check_available()
    if reason is not None:
        pytest.skip(f"cupy backend unavailable: {reason}")
    return backend
