"""``python -m roi_ops info``: versions, every backend with its capabilities, and auto's pick."""

from __future__ import annotations

import platform

import torch

from .backend import RoIPoolProblem
from .dispatch import BackendUnavailableError, effective_spec, resolve_backend
from .registry import list_backends


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def auto_choice(device: torch.device, dtype: torch.dtype) -> str:
    """The backend `auto` (or ROI_OPS_BACKEND / use_backend) would pick for a call now."""
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    problem = RoIPoolProblem(
        torch.empty((1, 1, 1, 1), dtype=dtype, device=device),
        torch.zeros((1, 5), dtype=rois_dtype, device=device),
        1,
        1,
        1.0,
        True,
    )
    try:
        return resolve_backend("auto", problem).name
    except BackendUnavailableError:
        return "(none usable)"


def info_text() -> str:
    """The report printed by ``python -m roi_ops info``."""
    import roi_ops

    lines = [
        f"roi_ops {roi_ops.__version__}   torch {torch.__version__}   "
        f"CUDA {torch.version.cuda or 'none'} (available: {torch.cuda.is_available()})   "
        f"Python {platform.python_version()}",
        "",
        f"{'backend':<10} {'avail':<6} {'prio':>4} {'det':<4} {'devices':<10} "
        f"{'dtypes':<34} {'distribution':<22} reasons",
    ]
    for info in list_backends():
        dist = f"{info.distribution or info.origin} {info.version or ''}".strip()
        lines.append(
            f"{info.name:<10} {'yes' if info.available else 'no':<6} {info.priority:>4} "
            f"{'yes' if info.deterministic else 'no':<4} {','.join(info.device_types):<10} "
            f"{','.join(info.dtypes):<34} {dist:<22} {'; '.join(info.reasons) or '-'}"
        )
    spec, source = effective_spec("auto")
    lines += ["", f"selection: {spec!r} (from {source})"]
    for device in _devices():
        picks = ", ".join(
            f"{str(d).removeprefix('torch.')}: {auto_choice(device, d)}"
            for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        )
        lines.append(f"  {device}: {picks}")
    return "\n".join(lines)
