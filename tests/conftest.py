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


@pytest.fixture(params=["eager", "custom-op"])
def call_path(request, monkeypatch):
    """Run the test through the eager fast path and through the ``roi_ops::roi_pool`` op."""
    if request.param == "custom-op":
        import roi_ops.functional

        monkeypatch.setattr(roi_ops.functional, "plain_eager", lambda *_: False)
    return request.param
