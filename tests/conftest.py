"""Shared pytest configuration: report how many exact reference comparisons ran."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter):
    from roi_ops.testing.cases import COMPARISONS

    if COMPARISONS:
        per_backend = ", ".join(f"{name}: {count}" for name, count in sorted(COMPARISONS.items()))
        total = sum(COMPARISONS.values())
        terminalreporter.write_line(
            f"reference comparisons (output bits, argmax, gradient): {total} ({per_backend})"
        )


def pytest_configure(config):
    # Without a GPU, Triton kernels run through Triton's CPU interpreter; the variable must be
    # set before triton is imported. On a GPU machine the real compiler is used.
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(params=["eager", "eager-native", "custom-op"])
def call_path(request, monkeypatch):
    """Run the test through the eager fast path (with the Python Function, and with the C++
    autograd node of `roi_ops.native`) and through the ``roi_ops::roi_pool`` op."""
    import roi_ops.native

    if request.param == "custom-op":
        import roi_ops.functional

        monkeypatch.setattr(roi_ops.functional, "plain_eager", lambda *_: False)
    if request.param == "eager-native":
        monkeypatch.setattr(roi_ops.native, "attach", native_attach())
    else:
        monkeypatch.setattr(roi_ops.native, "attach", None)
    return request.param


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
