"""Run-time switches: the value checks, and output poisoning for tests.

Both are read when a call runs (never at import), so they also take effect inside compiled
graphs, where the roi_pool op body runs eagerly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

VALUE_CHECKS_ENV = "ROI_OPS_VALUE_CHECKS"

_value_checks_global: bool | None = None
_value_checks_context: ContextVar[bool | None] = ContextVar("roi_ops_value_checks", default=None)
_poison_context: ContextVar[bool] = ContextVar("roi_ops_poison_outputs", default=False)


def set_value_checks(enabled: bool) -> None:
    """Turn the ROI value checks (batch index range, finite coordinates) on or off globally.

    The checks read the ROIs and so synchronise CUDA devices. Precedence: the `value_checks`
    context manager, then this setting, then the environment variable ``ROI_OPS_VALUE_CHECKS``
    (``0``/``false``/``off`` disables), then on.
    """
    global _value_checks_global
    _value_checks_global = bool(enabled)


@contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Context manager that turns the ROI value checks on or off inside its block."""
    token = _value_checks_context.set(bool(enabled))
    try:
        yield
    finally:
        _value_checks_context.reset(token)


def value_checks_enabled() -> bool:
    """Whether the ROI value checks run for a call made now."""
    in_context = _value_checks_context.get()
    if in_context is not None:
        return in_context
    if _value_checks_global is not None:
        return _value_checks_global
    return env_flag(VALUE_CHECKS_ENV)


def env_flag(name: str) -> bool:
    """Whether the environment variable `name` leaves a setting on: true unless it is set to
    0, false, off or no (any case, surrounding spaces ignored)."""
    return os.environ.get(name, "1").strip().lower() not in {"0", "false", "off", "no"}


@contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill output buffers with NaN and argmax buffers with -7 before backends write them.

    For tests: any element a backend forgets to write shows up as a mismatch.
    """
    token = _poison_context.set(True)
    try:
        yield
    finally:
        _poison_context.reset(token)


def poisoning_enabled() -> bool:
    """Whether outputs are poisoned before backends run (see `poisoned_outputs`)."""
    return _poison_context.get()
