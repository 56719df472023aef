"""Run-time switches: the ROI value checks, and output poisoning for tests.

Both are read when a call runs (never at import), so they also take effect inside compiled
graphs, where the roi_pool op body runs eagerly.

Value checks (docs/contract.md, "Bad input") have three modes:

- ``"on"`` (the default): invalid ROI rows raise a ValueError naming the first of them. On the
  CPU the error comes from the call itself. On CUDA nothing waits for the device: the forward
  kernel records bad rows on the device and roi_ops raises at a later roi_ops call on that device
  (forward or backward) that finds the record, or at `roi_ops.check_errors()`, which waits.
- ``"immediate"``: CUDA calls read the ROIs before running and raise at the call itself; this
  synchronises the device on every call.
- ``"off"``: no checks; invalid rows give zeros with argmax -1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

VALUE_CHECKS_ENV = "ROI_OPS_VALUE_CHECKS"
ValueCheckMode = Literal["on", "immediate", "off"]
MODES: tuple[str, ...] = ("on", "immediate", "off")
_OFF_WORDS = {"0", "false", "off", "no"}
_ON_WORDS = {"", "1", "true", "on", "yes"}

# os.environ's own bytes dict (POSIX CPython): a read is one dict lookup, without
# os.environ.get's key encoding, and still sees every change made through os.environ.
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def environ_get(name: str, key: bytes | None = None) -> str | None:
    """``os.environ.get(name)``, fast on the hot path (`key` is ``name.encode()``)."""
    if _ENVIRON_BYTES is not None:
        raw = _ENVIRON_BYTES.get(key if key is not None else name.encode())
        return None if raw is None else os.fsdecode(raw)
    return os.environ.get(name)


_VALUE_CHECKS_KEY = VALUE_CHECKS_ENV.encode()
_value_checks_global: str | None = None
_value_checks_context: ContextVar[str | None] = ContextVar("roi_ops_value_checks", default=None)
_poison_context: ContextVar[bool] = ContextVar("roi_ops_poison_outputs", default=False)


def _mode(value: bool | str, what: str) -> str:
    """The mode that `value` (True, False, or a mode name in any case) stands for."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        word = value.strip().lower()
        if word in MODES:
            return word
        if word in _OFF_WORDS:
            return "off"
        if word in _ON_WORDS:
            return "on"
    raise ValueError(f"{what}: expected True, False, 'on', 'immediate' or 'off', got {value!r}")


def set_value_checks(mode: bool | ValueCheckMode) -> None:
    """Set the ROI value checks for the whole process: ``True``/``"on"`` (the default),
    ``"immediate"`` or ``False``/``"off"`` (see this module's docstring).

    Precedence: the `value_checks` context manager, then this setting, then the environment
    variable ``ROI_OPS_VALUE_CHECKS`` (``0``/``false``/``off``, ``immediate``, ``1``/``on``),
    then ``"on"``.

    Raises:
        ValueError: `mode` is none of those.
    """
    global _value_checks_global
    _value_checks_global = _mode(mode, "mode")


@contextmanager
def value_checks(mode: bool | ValueCheckMode) -> Iterator[None]:
    """Context manager that sets the ROI value-check mode inside its block (as
    `set_value_checks`; thread- and task-local)."""
    token = _value_checks_context.set(_mode(mode, "mode"))
    try:
        yield
    finally:
        _value_checks_context.reset(token)


def value_check_mode() -> str:
    """The value-check mode for a call made now: ``"on"``, ``"immediate"`` or ``"off"``."""
    in_context = _value_checks_context.get()
    if in_context is not None:
        return in_context
    if _value_checks_global is not None:
        return _value_checks_global
    from_env = environ_get(VALUE_CHECKS_ENV, _VALUE_CHECKS_KEY)
    if from_env is None:
        return "on"
    try:
        return _mode(from_env, VALUE_CHECKS_ENV)
    except ValueError:
        return "on"  # `python -m roi_ops info` reports the unreadable setting


def value_checks_enabled() -> bool:
    """Whether invalid ROIs raise errors for a call made now (mode ``"on"`` or
    ``"immediate"``)."""
    return value_check_mode() != "off"


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


def env_flag(name: str) -> bool:
    """Whether the environment variable `name` leaves a setting on: true unless it is set to
    0, false, off or no (any case, surrounding spaces ignored)."""
    return os.environ.get(name, "1").strip().lower() not in _OFF_WORDS
