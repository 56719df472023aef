"""Choosing a backend for a call, with the reasons behind every choice.

Resolution, highest first: the ``backend=`` argument; `use_backend`; the environment variable
``ROI_OPS_BACKEND`` (read at every call); ``auto``, the usable backend of highest priority. A
comma-separated list means the first usable of those names. A named backend never falls back
silently: if it cannot run, the error lists every backend with its reasons.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .backend import Backend, RoIPoolProblem
from .registry import REGISTRY, BackendEntry

BACKEND_ENV = "ROI_OPS_BACKEND"
AUTO = "auto"

_context_backend: ContextVar[str | None] = ContextVar("roi_ops_backend", default=None)


class BackendError(RuntimeError):
    """A backend failed while running (the message names it)."""


class BackendNotFoundError(ValueError):
    """A backend name that no installed or registered backend has."""


class BackendUnavailableError(RuntimeError):
    """No requested backend can run the call; the message lists every backend's reasons."""


@contextmanager
def use_backend(spec: str) -> Iterator[None]:
    """Use `spec` (a name, ``"auto"`` or a comma-separated list) for calls inside the block.

    Nestable; thread- and asyncio-task-safe (a context variable). An explicit ``backend=``
    argument other than ``"auto"`` still wins.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec: expected a backend name string, got {type(spec).__name__}")
    token = _context_backend.set(spec)
    try:
        yield
    finally:
        _context_backend.reset(token)


def effective_spec(argument: str) -> tuple[str, str]:
    """(spec, where it came from) for a call whose ``backend=`` argument is `argument`."""
    if argument.strip() != AUTO:
        return argument, "the backend= argument"
    in_context = _context_backend.get()
    if in_context is not None:
        return in_context, "roi_ops.use_backend()"
    from_env = os.environ.get(BACKEND_ENV, "").strip()
    if from_env:
        return from_env, f"the {BACKEND_ENV} environment variable"
    return AUTO, "the default"


def reasons_against(entry: BackendEntry, problem: RoIPoolProblem) -> list[str]:
    """Why `entry` cannot run `problem` (empty when it can)."""
    unavailable = REGISTRY.availability(entry)
    if unavailable is not None:
        return [unavailable]
    try:
        return list(entry.backend.not_supported_reasons(problem))
    except Exception as error:
        return [f"not_supported_reasons raised {type(error).__name__}: {error}"]


def _describe_problem(problem: RoIPoolProblem) -> str:
    dtype = str(problem.dtype).removeprefix("torch.")
    return f"input on {problem.device} ({dtype}, shape {tuple(problem.input.shape)})"


def backend_report(problem: RoIPoolProblem) -> str:
    """Every backend, one per line, with whether it can run `problem` and why not."""
    lines = []
    for entry in REGISTRY.entries():
        reasons = reasons_against(entry, problem)
        priority = entry.backend.priority if entry.backend else "-"
        verdict = "usable" if not reasons else "; ".join(reasons)
        lines.append(f"  {entry.name} (priority {priority}): {verdict}")
    if not lines:
        lines.append(
            "  (no backends: is roi_ops installed? `pip install -e .` registers the torch backend)"
        )
    return "\n".join(lines)


def _declares_device(entry: BackendEntry, device_type: str) -> bool:
    types = entry.backend.device_types if entry.backend is not None else frozenset()
    return "*" in types or device_type in types


def _choose_auto(problem: RoIPoolProblem) -> Backend | None:
    # Only backends that declare the device type: a backend may accept more when named
    # explicitly (Triton's CPU interpreter, say) without being chosen automatically there.
    for entry in REGISTRY.entries():
        if _declares_device(entry, problem.device.type) and not reasons_against(entry, problem):
            return entry.backend
    return None


def resolve_backend(argument: str, problem: RoIPoolProblem) -> Backend:
    """The backend that runs `problem` for a call with ``backend=argument``.

    Raises:
        BackendNotFoundError: a requested name is not registered (lists the known names).
        BackendUnavailableError: none of the requested backends can run `problem`.
    """
    spec, source = effective_spec(argument)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise BackendNotFoundError(f"backend: expected a backend name, got {spec!r} from {source}")
    for name in names:
        if name != AUTO and REGISTRY.get(name) is None:
            known = ", ".join([AUTO, *REGISTRY.names()])
            raise BackendNotFoundError(
                f"backend: unknown backend {name!r} (from {source}); known backends: {known}"
            )
    for name in names:
        if name == AUTO:
            chosen = _choose_auto(problem)
            if chosen is not None:
                return chosen
            continue
        entry = REGISTRY.get(name)
        if not reasons_against(entry, problem):
            return entry.backend
    wanted = "any backend" if names == [AUTO] else " or ".join(repr(n) for n in names)
    raise BackendUnavailableError(
        f"backend: {wanted} (from {source}) cannot run this call, {_describe_problem(problem)}."
        f"\nBackends:\n{backend_report(problem)}"
    )
