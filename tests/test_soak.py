"""Soak on the CPU: 10,000 calls with varying K, N, H, W; memory flat, no recompilation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import roi_ops

SOAK = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("roi_ops_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_numba_soak_10000_calls():
    if "numba" not in [i.name for i in roi_ops.list_backends() if i.available]:
        pytest.skip("numba backend not available")
    result = _soak_module().soak("numba", "cpu", calls=10_000, warmup=200, models=((16, 7), (8, 3)))
    print(result)
    assert result["ok"], result
