"""Packaging and availability: the entry point, a cheap import, the interpreter's CPU tensors,
the one reading of TRITON_INTERPRET, and the PTX check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from triton_cases import CUDA, INTERPRET

from roi_ops.backend import RoIPoolProblem
from roi_ops.registry import REGISTRY
from roi_ops_triton.backend import TritonBackend
from roi_ops_triton.interpreter import interpreting


def test_registered_through_the_entry_point():
    entry = REGISTRY.get("triton")
    assert entry is not None and entry.distribution == "roi-ops-triton"
    assert REGISTRY.availability(entry) is None or not INTERPRET


def test_declarations():
    """A portable GPU backend below CuPy in `auto`'s order, reporting bad ROIs itself, with an
    atomic (not run-to-run deterministic) backward."""
    assert TritonBackend.priority == 100
    assert TritonBackend.reports_bad_rois and not TritonBackend.deterministic_backward
    import roi_ops_triton.backend as module

    for text in (module.__doc__, TritonBackend.__doc__, TritonBackend.description):
        assert "default gpu backend" not in text.lower()


def test_backend_module_does_not_import_triton():
    code = "import sys, roi_ops_triton.backend; assert 'triton' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "value, expected",
    [("1", True), ("true", True), ("ON", True), ("0", False), ("off", False), ("", False)],
)
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, expected):
    pytest.importorskip("triton")
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is expected
    assert interpreting() is bool(knobs.runtime.interpret)


def test_cpu_accepted_only_under_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    problem = RoIPoolProblem(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), 1, 1, 1.0, True)
    backend = TritonBackend()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.not_supported_reasons(problem) == []
    assert backend.check_available() is None
    assert backend.device_types == frozenset({"cuda"})  # so `auto` never picks the interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    reasons = backend.not_supported_reasons(problem)
    assert len(reasons) == 1 and "cpu" in reasons[0]
    if not CUDA:
        assert "CUDA" in backend.check_available()


@pytest.mark.skipif(CUDA, reason="with a GPU the compiled kernels themselves are tested")
def test_compiles_for_sm90_with_exact_arithmetic():
    """Compile every kernel's variants for sm_90 without a GPU; the PTX must have no fused
    multiply-add, only correctly rounded divisions, no flush-to-zero comparisons, and atomic
    minimums exactly where bad ROIs are reported (roi_ops_triton.ptx_check)."""
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not (os.path.exists(ptxas) or os.environ.get("TRITON_PTXAS_PATH")):
        pytest.skip("Triton's NVIDIA backend has no ptxas here")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "roi_ops_triton.ptx_check"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
