"""``python -m roi_ops info``: versions, every backend with its capabilities, and auto's pick.

The report never raises for a bad selection (``ROI_OPS_BACKEND`` naming no backend, or one that
cannot run anywhere here): it says so in the report, which is when a user needs it most.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

import torch

from .backend import RoIPoolProblem
from .dispatch import (
    AUTO,
    BackendUnavailableError,
    effective_spec,
    reasons_against,
    resolve_backend,
    use_backend,
)
from .registry import REGISTRY, list_backends

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _probe(device: torch.device, dtype: torch.dtype) -> RoIPoolProblem:
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    return RoIPoolProblem(
        torch.empty((1, 1, 1, 1), dtype=dtype, device=device),
        torch.zeros((1, 5), dtype=rois_dtype, device=device),
        1,
        1,
        1.0,
        True,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def choice(device: torch.device, dtype: torch.dtype, spec: str | None = None) -> str:
    """What a call with ``backend="auto"`` on `device` and `dtype` would run now: a backend name,
    or ``"error: ..."`` with the first line of the error such a call would raise.

    `spec` overrides the current selection (``use_backend``, ``ROI_OPS_BACKEND``); ``"auto"``
    gives the pick of plain ``auto``.
    """
    problem = _probe(device, dtype)
    try:
        if spec is None:
            return resolve_backend(AUTO, problem).name
        with use_backend(spec):
            return resolve_backend(AUTO, problem).name
    except BackendUnavailableError:
        wanted = spec if spec is not None else effective_spec(AUTO)[0]
        names = [n.strip() for n in wanted.split(",") if n.strip() and n.strip() != AUTO]
        reasons = [
            f"{name}: {'; '.join(reasons_against(REGISTRY.get(name), problem))}" for name in names
        ]
        return "error: nothing usable" + (f" ({', '.join(reasons)})" if reasons else "")
    except Exception as error:  # the report shows what a call would raise
        return f"error: {_first_line(error)}"


def auto_choice(device: torch.device, dtype: torch.dtype) -> str:
    """The backend `auto` (or ROI_OPS_BACKEND / use_backend) would pick for a call now, or
    ``"(none usable)"``, or the error a call would raise."""
    picked = choice(device, dtype)
    return "(none usable)" if picked.startswith("error: nothing usable") else picked


@dataclass
class SelectionReport:
    """The current backend selection and what it does on each device of this machine."""

    spec: str
    source: str
    unknown: list[str] = field(default_factory=list)
    picks: dict[str, dict[str, str]] = field(default_factory=dict)  # device -> dtype -> pick

    @property
    def usable_somewhere(self) -> bool:
        return any(not p.startswith("error") for row in self.picks.values() for p in row.values())

    @property
    def problem(self) -> str | None:
        """Why the selection is a mistake (every call would fail), or None."""
        if self.unknown:
            known = ", ".join([AUTO, *REGISTRY.names()])
            return (
                f"{', '.join(repr(n) for n in self.unknown)} is not a backend name (known: "
                f"{known}), so every roi_ops call that does not pass backend= raises "
                "BackendNotFoundError"
            )
        if not self.usable_somewhere:
            return (
                f"{self.spec!r} cannot run on any device and dtype of this machine, so every "
                "roi_ops call that does not pass backend= raises BackendUnavailableError"
            )
        return None


def selection_report() -> SelectionReport:
    """The current selection (``use_backend``, ``ROI_OPS_BACKEND`` or ``auto``), checked."""
    spec, source = effective_spec(AUTO)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n != AUTO and REGISTRY.get(n) is None]
    report = SelectionReport(spec, source, unknown)
    for device in _devices():
        report.picks[str(device)] = {
            str(d).removeprefix("torch."): choice(device, d) for d in DTYPES
        }
    return report


def _fix_hint(source: str) -> str:
    if "environment" in source:
        return "unset ROI_OPS_BACKEND or set it to a name listed above"
    return "pass a name listed above"


def info_text() -> str:
    """The report printed by ``python -m roi_ops info``."""
    return info_report()[0]


def _determinism(info) -> str:
    """'yes' (forward and backward), 'fwd' (forward only: deterministic mode uses roi_ops'
    shared scatter for its backward) or 'no'."""
    if not info.deterministic:
        return "no"
    return "yes" if info.deterministic_backward in (True, None) else "fwd"


def info_report() -> tuple[str, bool]:
    """(the report, whether the current selection is usable at all)."""
    import roi_ops

    lines = [
        f"roi_ops {roi_ops.__version__}   torch {torch.__version__}   "
        f"CUDA {torch.version.cuda or 'none'} (available: {torch.cuda.is_available()})   "
        f"Python {platform.python_version()}",
        "",
        f"{'backend':<10} {'avail':<6} {'prio':>4} {'det':<5} {'devices':<10} "
        f"{'dtypes':<34} {'distribution':<22} reasons",
    ]
    for info in list_backends():
        dist = f"{info.distribution or info.origin} {info.version or ''}".strip()
        lines.append(
            f"{info.name:<10} {'yes' if info.available else 'no':<6} {info.priority:>4} "
            f"{_determinism(info):<5} {','.join(info.device_types):<10} "
            f"{','.join(info.dtypes):<34} {dist:<22} {'; '.join(info.reasons) or '-'}"
        )
    from . import native

    lines += ["", f"C++ autograd node (roi_ops.native): {native.status()}"]
    report = selection_report()
    lines += ["", f"selection: {report.spec!r} (from {report.source})"]
    problem = report.problem
    if problem:
        lines.append(f"  PROBLEM: {problem}; {_fix_hint(report.source)}.")
    for device, row in report.picks.items():
        lines.append(f"  {device}: {_picks(row)}")
    if report.spec.strip() != AUTO:
        lines.append("what plain auto would pick:")
        for device in _devices():
            row = {str(d).removeprefix("torch."): choice(device, d, AUTO) for d in DTYPES}
            lines.append(f"  {device}: {_picks(row)}")
    return "\n".join(lines), problem is None


def _picks(row: dict[str, str]) -> str:
    """One device's picks per dtype; one entry when every dtype gets the same."""
    if len(set(row.values())) == 1:
        return f"every dtype: {next(iter(row.values()))}"
    return ", ".join(f"{dtype}: {pick}" for dtype, pick in row.items())
