"""roi_ops.native: the C++ autograd node of the eager fast path. The call-path tests (the
``call_path`` fixture's "eager-native") run the autograd suite through it; these check what is
particular to it: that it is the node in use, saved tensors, errors raised in the backward, and
how the build is started, switched off and reported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import native_attach, small_inputs

import roi_ops
import roi_ops.native
from roi_ops import autograd


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr(roi_ops.native, "attach", native_attach())


def test_the_node_is_the_cpp_one_and_matches_the_function(native, monkeypatch):
    x, rois = small_inputs()
    results = []
    for attach in (roi_ops.native.attach, None):
        monkeypatch.setattr(roi_ops.native, "attach", attach)
        leaf = x.clone().requires_grad_(True)
        out = roi_ops.roi_pool(leaf * 2, rois, (3, 2), 0.5)  # a non-leaf input
        expected = "RoIPoolBackward" if attach is not None else "RoIPoolFunctionBackward"
        assert out.grad_fn.name() == expected
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    (out, grad), (out_function, grad_function) = results
    assert torch.equal(out, out_function) and torch.equal(grad, grad_function)
    assert grad.abs().sum() > 0


def test_saved_tensors_go_through_saved_tensor_hooks(native):
    x, rois = small_inputs()
    leaf = x.clone().requires_grad_(True)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.dtype)
        return t

    def unpack(t):
        unpacked.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = roi_ops.roi_pool(leaf, rois, 2, 0.5)
    assert sorted(map(str, packed)) == sorted(map(str, [rois.dtype, torch.int32]))
    out.sum().backward()
    assert sorted(map(str, unpacked)) == sorted(map(str, packed))


def test_backward_twice_needs_retain_graph(native):
    x, rois = small_inputs()
    leaf = x.clone().requires_grad_(True)
    out = roi_ops.roi_pool(leaf, rois, 2, 0.5)
    out.sum().backward(retain_graph=True)
    first = leaf.grad.clone()
    out.sum().backward()
    assert torch.equal(leaf.grad, 2 * first)
    with pytest.raises(RuntimeError, match="second time"):
        out.sum().backward()


def test_an_error_in_the_gradient_reaches_the_caller_with_its_type(native, monkeypatch):
    x, rois = small_inputs()
    leaf = x.clone().requires_grad_(True)
    out = roi_ops.roi_pool(leaf, rois, 2, 0.5)

    def failing(*_args, **_kwargs):
        raise ValueError("rois: a stand-in for the bad-ROI error raised at a backward")

    monkeypatch.setattr(autograd, "run_backward", failing)
    with pytest.raises(ValueError, match="stand-in"):
        out.sum().backward()


def _run(code: str, **env: str) -> str:
    environment = {**os.environ, **env}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_roi_ops_native_0_stops_the_automatic_build():
    code = """
import torch, roi_ops, roi_ops.native as native
x = torch.randn(1, 2, 5, 5, requires_grad=True)
roi_ops.roi_pool(x, torch.tensor([[0.0, 0, 0, 3, 3]]), 2).sum().backward()
print(native.status(), native.attach is None)
"""
    assert _run(code, ROI_OPS_NATIVE="0") == "off (ROI_OPS_NATIVE=0) True"


def test_the_first_call_that_needs_a_gradient_starts_the_build():
    native_attach()  # built once here, so the child loads it from torch's cache
    code = """
import torch, roi_ops, roi_ops.native as native
x = torch.randn(1, 2, 5, 5, requires_grad=True)
rois = torch.tensor([[0.0, 0, 0, 3, 3]])
with torch.no_grad():
    roi_ops.roi_pool(x, rois, 2)
before = native.status()
roi_ops.roi_pool(x, rois, 2).sum().backward()
built = native.wait(timeout=600)
print(before, "|", built, roi_ops.roi_pool(x, rois, 2).grad_fn.name())
"""
    assert _run(code, ROI_OPS_NATIVE="1") == "not started | True RoIPoolBackward"


def test_a_failed_build_keeps_the_python_path_and_says_why(monkeypatch):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(roi_ops.native, "_compile", no_compiler)
    for name, value in (("attach", None), ("build_error", None), ("_finished", False)):
        monkeypatch.setattr(roi_ops.native, name, value)
    monkeypatch.setattr(roi_ops.native, "_status", "not started")
    assert not roi_ops.native.build()
    assert roi_ops.native.attach is None
    assert isinstance(roi_ops.native.build_error, RuntimeError)
    assert roi_ops.native.status().startswith("build failed, so calls keep the Python autograd")
    assert "Ninja is required" in roi_ops.native.status()


def test_a_failed_background_build_keeps_the_python_path(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    code = """
import torch, roi_ops, roi_ops.native as native
x = torch.randn(1, 2, 5, 5, requires_grad=True)
rois = torch.tensor([[0.0, 0, 0, 3, 3]])
roi_ops.roi_pool(x, rois, 2).sum().backward()
built = native.wait(timeout=600)
out = roi_ops.roi_pool(x, rois, 2)
out.sum().backward()
print(built, out.grad_fn.name(), "|", native.status())
"""
    output = _run(code, ROI_OPS_NATIVE="1", TORCH_EXTENSIONS_DIR=str(not_a_folder))
    assert output.startswith("False RoIPoolFunctionBackward | build failed"), output
    assert "the build process exited with status" in output


def test_the_command_line_builds_and_reports(native):
    from roi_ops.__main__ import main

    assert main(["build-native"]) == 0
