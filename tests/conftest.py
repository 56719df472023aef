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
