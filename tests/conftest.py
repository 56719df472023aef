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
        from helpers import native_attach

        monkeypatch.setattr(roi_ops.native, "attach", native_attach())
    else:
        monkeypatch.setattr(roi_ops.native, "attach", None)
    return request.param
