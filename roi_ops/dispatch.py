"""Choosing a backend for a call, with the reasons behind every choice.

Resolution, highest first: the ``backend=`` argument; `use_backend`; the environment variable
``ROI_OPS_BACKEND`` (read at every call); ``auto``, the usable backend of highest priority. A
comma-separated list means the first usable of those names. Names ignore case. A named backend
never falls back silently: if it cannot run, the error lists every backend with its reasons.

Choices are cheap on the hot path: the ordered candidates for a (request, device type) pair are
cached per registry version (registering or removing a backend takes effect at once), and only
the candidates' `not_supported_reasons` run per call. `explain` shows a choice and its reasons;
the ``roi_ops.dispatch`` logger (``ROI_OPS_LOG=debug``, or the logging module) logs every choice.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .backend import Backend, RoIPoolProblem, device_type_of
from .config import environ_get
from .registry import REGISTRY, BackendEntry

BACKEND_ENV = "ROI_OPS_BACKEND"
LOG_ENV = "ROI_OPS_LOG"
AUTO = "auto"
_BACKEND_KEY = BACKEND_ENV.encode()

logger = logging.getLogger("roi_ops.dispatch")

_context_backend: ContextVar[str | None] = ContextVar("roi_ops_backend", default=None)


class BackendError(RuntimeError):
    """A backend failed while running (the message names it)."""


class BackendNotFoundError(ValueError):
    """A backend name that no installed or registered backend has."""


class BackendUnavailableError(RuntimeError):
    """No requested backend can run the call; the message lists every backend's reasons."""


def _configure_logging_from_env() -> None:
    level = os.environ.get(LOG_ENV, "").strip().upper()
    if level in ("DEBUG", "INFO"):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)


_configure_logging_from_env()


# Names -------------------------------------------------------------------------------------


def split_spec(spec: str) -> list[str]:
    """The names of a backend request (``"auto"``, a name, or a comma-separated list)."""
    return [name.strip() for name in spec.split(",") if name.strip()]


def _suggestion(name: str) -> str:
    known = [AUTO, *REGISTRY.names()]
    close = difflib.get_close_matches(name.casefold(), [k.casefold() for k in known], n=1)
    if not close:
        return ""
    match = next(k for k in known if k.casefold() == close[0])
    return f"did you mean {match!r}?"


def check_spec(spec: object, what: str = "backend", source: str = "") -> list[str]:
    """Check that every name in `spec` is ``auto`` or a known backend (any case).

    Returns the names. Raises TypeError for a non-string, BackendNotFoundError (with the closest
    known name) for an unknown or empty name.
    """
    if not isinstance(spec, str):
        raise TypeError(
            f"{what}: expected a backend name or 'auto' as a string, got {type(spec).__name__}"
        )
    names = split_spec(spec)
    origin = f" (from {source})" if source else ""
    if not names:
        raise BackendNotFoundError(
            f"{what}: expected a backend name or 'auto', got {spec!r}{origin}"
        )
    for name in names:
        if name.casefold() != AUTO and REGISTRY.get(name) is None:
            known = ", ".join([AUTO, *REGISTRY.names()])
            suggestion = _suggestion(name)
            suggestion = f"; {suggestion}" if suggestion else ""
            raise BackendNotFoundError(
                f"{what}: unknown backend {name!r}{origin}{suggestion}; known backends: {known} "
                "(`python -m roi_ops info` lists them with their status)"
            )
    return names


@contextmanager
def use_backend(spec: str) -> Iterator[None]:
    """Use `spec` (a name, ``"auto"`` or a comma-separated list) for calls inside the block.

    Nestable; thread- and asyncio-task-safe (a context variable). An explicit ``backend=``
    argument other than ``"auto"`` still wins. The names are checked on entry.

    Raises:
        TypeError: `spec` is not a string.
        BackendNotFoundError: a name is not a known backend (with the closest known name).
    """
    check_spec(spec, "spec")
    token = _context_backend.set(spec)
    try:
        yield
    finally:
        _context_backend.reset(token)


def effective_spec(argument: str) -> tuple[str, str]:
    """(spec, where it came from) for a call whose ``backend=`` argument is `argument`."""
    if argument != AUTO and argument.strip().casefold() != AUTO:
        return argument, "the backend= argument"
    in_context = _context_backend.get()
    if in_context is not None:
        return in_context, "roi_ops.use_backend()"
    from_env = environ_get(BACKEND_ENV, _BACKEND_KEY)
    if from_env and from_env.strip():
        return from_env.strip(), f"the {BACKEND_ENV} environment variable"
    return AUTO, "the default"


# Reasons -----------------------------------------------------------------------------------

_NOT_DETERMINISTIC = (
    "its forward is not deterministic and torch.use_deterministic_algorithms(True) is on"
)


def reasons_against(entry: BackendEntry, problem: RoIPoolProblem) -> list[str]:
    """Why `entry` cannot run `problem` (empty when it can)."""
    unavailable = REGISTRY.availability(entry)
    if unavailable is not None:
        return [unavailable]
    backend = entry.backend
    try:
        reasons = list(backend.not_supported_reasons(problem))
    except Exception as error:
        return [f"not_supported_reasons raised {type(error).__name__}: {error}"]
    if not backend.deterministic and torch.are_deterministic_algorithms_enabled():
        reasons.append(_NOT_DETERMINISTIC)
    return reasons


def _describe_problem(problem: RoIPoolProblem) -> str:
    dtype = str(problem.input.dtype).removeprefix("torch.")
    return f"input on {problem.input.device} ({dtype}, shape {tuple(problem.input.shape)})"


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


# Resolution --------------------------------------------------------------------------------

# (spec, device type, registry version) -> the backends to try, in order. Only backends that
# can run at all are listed; `auto` lists those that declare the device type (a backend may
# accept more when named, like Triton's CPU interpreter, without being chosen automatically).
_candidates: dict[tuple[str, str, int], tuple[Backend, ...]] = {}


def _candidates_for(spec: str, source: str, device_type: str) -> tuple[Backend, ...]:
    key = (spec, device_type, REGISTRY.version)
    cached = _candidates.get(key)
    if cached is not None:
        return cached
    names = check_spec(spec, "backend", source)
    chosen: list[Backend] = []
    for name in names:
        if name.casefold() == AUTO:
            entries = [e for e in REGISTRY.entries() if _declares_device(e, device_type)]
        else:
            entries = [REGISTRY.get(name)]
        for entry in entries:
            if REGISTRY.availability(entry) is None and entry.backend not in chosen:
                chosen.append(entry.backend)
    result = tuple(chosen)
    if len(_candidates) > 256:
        _candidates.clear()
    _candidates[key] = result
    return result


def resolve_backend(argument: str, problem: RoIPoolProblem) -> Backend:
    """The backend that runs `problem` for a call with ``backend=argument``.

    Raises:
        BackendNotFoundError: a requested name is not registered (with the closest name).
        BackendUnavailableError: none of the requested backends can run `problem` (lists
            every backend's reasons, and what to do).
    """
    spec, source = effective_spec(argument)
    deterministic = None
    for backend in _candidates_for(spec, source, device_type_of(problem.input)):
        if backend.not_supported_reasons(problem):
            continue
        if not backend.deterministic:
            if deterministic is None:
                deterministic = torch.are_deterministic_algorithms_enabled()
            if deterministic:
                continue
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s -> %r (request %r from %s)", problem, backend.name, spec, source)
        return backend
    raise BackendUnavailableError(_unavailable_message(spec, source, problem))


def _unavailable_message(spec: str, source: str, problem: RoIPoolProblem) -> str:
    names = split_spec(spec)
    auto = [n.casefold() for n in names] == [AUTO]
    wanted = "any backend" if auto else " or ".join(repr(n) for n in names)
    hints = []
    device_type = problem.input.device.type
    for name in names:
        entry = None if name.casefold() == AUTO else REGISTRY.get(name)
        if entry is None or entry.backend is None or _declares_device(entry, device_type):
            continue
        types = sorted(entry.backend.device_types)
        hints.append(
            f"{entry.name!r} runs on {', '.join(types)} tensors: move input and rois there "
            f"(e.g. input.to('{types[0]}'), rois.to('{types[0]}')) or use backend='auto'"
        )
    if torch.are_deterministic_algorithms_enabled():
        hints.append(
            "torch.use_deterministic_algorithms(True) excludes backends whose forward is not "
            "deterministic"
        )
    hint = "".join(f"\nTo fix: {h}." for h in hints)
    return (
        f"backend: {wanted} (from {source}) cannot run this call, {_describe_problem(problem)}."
        f"\nBackends:\n{backend_report(problem)}{hint}"
    )


# Explaining --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Explanation:
    """What `explain` found: the backend a call would use and why.

    Attributes:
        backend: the chosen backend's name, or None when none can run the call.
        request: the backend request in effect (``"auto"``, a name or a list).
        source: where the request came from (argument, use_backend, environment, default).
        reasons: (name, priority, reasons it cannot run the call) for every backend.
        backward: how the gradient would be computed.
        value_checks: how invalid ROIs would be caught.
        error: the error the call would raise instead, if any.
    """

    backend: str | None
    request: str
    source: str
    reasons: tuple[tuple[str, int | None, tuple[str, ...]], ...]
    backward: str
    value_checks: str
    error: str | None = None

    def __str__(self) -> str:
        chosen = self.backend or "(none)"
        lines = [f"backend: {chosen}  (request {self.request!r} from {self.source})"]
        for name, priority, reasons in self.reasons:
            mark = "*" if name == self.backend else " "
            verdict = "usable" if not reasons else "; ".join(reasons)
            lines.append(f" {mark} {name} (priority {priority}): {verdict}")
        lines.append(f"backward: {self.backward}")
        lines.append(f"value checks: {self.value_checks}")
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


def backward_description(backend: Backend) -> str:
    """How the gradient of a call run by `backend` is computed, now."""
    if not backend.deterministic_backward and torch.are_deterministic_algorithms_enabled():
        return (
            f"roi_ops' shared deterministic scatter (the {backend.name} backend's backward is "
            "not deterministic and torch.use_deterministic_algorithms(True) is on)"
        )
    if type(backend).backward is Backend.backward:
        return f"roi_ops' shared deterministic scatter ({backend.name!r} has no backward)"
    kind = "deterministic" if backend.deterministic_backward else "not run-to-run deterministic"
    return f"the {backend.name} backend's own backward ({kind})"


def explain_problem(problem: RoIPoolProblem, backend: str = AUTO) -> Explanation:
    """`Explanation` of the choice for an already built `problem` (see `roi_ops.explain`)."""
    from .config import value_check_mode

    spec, source = effective_spec(backend)
    reasons = tuple(
        (
            entry.name,
            entry.backend.priority if entry.backend else None,
            tuple(reasons_against(entry, problem)),
        )
        for entry in REGISTRY.entries()
    )
    mode = value_check_mode()
    if problem.input.device.type == "meta":
        checks = "none: meta tensors hold no values (shapes only)"
    elif mode == "off":
        checks = "off: invalid rows give zeros and argmax -1"
    elif problem.input.device.type == "cuda" and mode == "on":
        checks = (
            "on, without waiting: invalid rows raise at a later roi_ops call on this device, "
            "or at roi_ops.check_errors()"
        )
    else:
        checks = "on: invalid rows raise at the call" + (
            " (reads the ROIs: synchronises the device)"
            if problem.input.device.type == "cuda"
            else ""
        )
    try:
        chosen = resolve_backend(backend, problem)
    except (BackendNotFoundError, BackendUnavailableError) as error:
        return Explanation(None, spec, source, reasons, "-", checks, str(error))
    return Explanation(chosen.name, spec, source, reasons, backward_description(chosen), checks)
