"""Charts of benchmark results (needs matplotlib): each backend's speed-up over torchvision.

One panel per mode (inference, forward, forward + backward); in each, one group of horizontal
bars per workload, one bar per backend, labelled with its speed-up. The line at 1x is
torchvision; a tick marks the speed-up a call running at the bytes-moved floor would have.
"""

from __future__ import annotations

import json
from pathlib import Path

PALETTE = {
    "cupy": "#2ca02c",
    "triton": "#1f77b4",
    "numba": "#9467bd",
    "auto": "#ff7f0e",
    "torch": "#7f7f7f",
    "example": "#8c564b",
}
MODES = (("infer", "inference"), ("fwd", "forward"), ("fwd+bwd", "forward + backward"))
TORCHVISION = "torchvision"
DEFAULT = "default"


def _ok(row: dict) -> bool:
    return not row.get("error") and bool(row.get("times_ms"))


def dtypes_in(document: dict) -> list[str]:
    """The dtypes with at least one successful measurement in `document`, in order."""
    return list(dict.fromkeys(r["dtype"] for r in document.get("results", []) if _ok(r)))


def chartable_dtypes(document: dict) -> list[str]:
    """The dtypes of `document` that `plot_results` can chart: measured by torchvision (or the
    torch backend) and by at least one other backend (torchvision has no bfloat16 kernel)."""
    rows = [r for r in document.get("results", []) if _ok(r)]
    return [
        dtype
        for dtype in dtypes_in(document)
        if all(_baseline_and_contenders([r for r in rows if r["dtype"] == dtype]))
    ]


def _baseline_and_contenders(results: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """The baseline backend of one dtype's rows (torchvision, else the torch backend, else None)
    and the (backend, settings) keys charted against it (the torch backend only when nothing
    else was measured)."""
    keys = list(dict.fromkeys(_key(r) for r in results))
    baseline_name = next((b for b in (TORCHVISION, "torch") if (b, DEFAULT) in keys), None)
    contenders = [k for k in keys if k != (baseline_name, DEFAULT)]
    if any(k[0] != "torch" for k in contenders):
        contenders = [k for k in contenders if k[0] != "torch"]
    return baseline_name, contenders


def _key(row: dict) -> tuple[str, str]:
    return row["backend"], row.get("settings", DEFAULT)


def _label(key: tuple[str, str]) -> str:
    backend, settings = key
    return backend if settings == DEFAULT else f"{backend} [{settings}]"


def plot_results(document: dict, path: str | Path, dtype: str | None = None) -> Path:
    """Write a PNG chart of `document` (the ``--json`` output) to `path` and return the path.

    The baseline is torchvision when the document has it, else the ``torch`` backend. The
    ``torch`` backend's own bars are left out when other backends are there to show. `dtype`
    picks one dtype (default: the first measured).

    Raises:
        ValueError: no successful measurement (of `dtype`), or no baseline to divide by.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in document.get("results", []) if _ok(r)]
    if not results:
        raise ValueError("document: expected at least one successful measurement, got none")
    dtype = dtype or results[0]["dtype"]
    results = [r for r in results if r["dtype"] == dtype]
    if not results:
        raise ValueError(
            f"dtype: no successful measurement of {dtype!r} (have: {dtypes_in(document)})"
        )
    baseline_name, contenders = _baseline_and_contenders(results)
    if baseline_name is None:
        raise ValueError(
            "document: charts show speed-ups over torchvision (or the torch backend), and "
            f"neither was measured for {dtype}; rerun bench with torchvision installed"
        )
    baseline = {r["workload"]: r for r in results if _key(r) == (baseline_name, DEFAULT)}
    if not contenders:
        raise ValueError(
            f"document: only {baseline_name} was measured for {dtype}; nothing to compare"
        )
    workloads = [w for w in dict.fromkeys(r["workload"] for r in results) if w in baseline]
    modes = [(m, t) for m, t in MODES if any(m in r["times_ms"] for r in results)]
    rows = {(r["workload"], *_key(r)): r for r in results}

    bar = 0.8 / len(contenders)
    height = 1.2 + len(workloads) * max(0.55, 0.3 * len(contenders))
    fig, axes = plt.subplots(
        1,
        len(modes),
        figsize=(4.3 * len(modes) + 1.2, height),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    speedups = [
        baseline[w]["times_ms"][m] / rows[(w, *k)]["times_ms"][m]
        for w in workloads
        for k in contenders
        for m, _ in modes
        if (w, *k) in rows and rows[(w, *k)]["times_ms"].get(m) and baseline[w]["times_ms"].get(m)
    ]
    limit = max([1.0, *speedups]) * 1.25
    handles = {}
    for ax, (mode, title) in zip(axes[0], modes, strict=True):
        floors = []
        for w, workload in enumerate(workloads):
            base = baseline[workload]["times_ms"].get(mode)
            floor_ms = baseline[workload].get("floor_ms", {}).get(mode)
            if base and floor_ms:
                floors.append((w, base / floor_ms))
            for c, key in enumerate(contenders):
                row = rows.get((workload, *key))
                time = row["times_ms"].get(mode) if row else None
                if not base or not time:
                    continue
                speedup = base / time
                y = w + (c - (len(contenders) - 1) / 2) * bar
                backend, settings = key
                drawn = ax.barh(
                    y,
                    speedup,
                    bar * 0.9,
                    color=PALETTE.get(backend, f"C{c}"),
                    hatch="//" if settings != DEFAULT else None,
                    alpha=0.55 if settings != DEFAULT else 1.0,
                    edgecolor="white",
                )
                handles.setdefault(_label(key), drawn)
                ax.text(speedup, y, f" {speedup:.2f}x", va="center", ha="left", fontsize=8)
        for w, ceiling in floors:
            ax.text(
                limit * 0.99,
                w + 0.5 - 0.04,
                f"floor {ceiling:.0f}x",
                ha="right",
                va="bottom",
                fontsize=7,
                color="#555555",
            )
        handles.setdefault(f"{baseline_name} (1x)", ax.axvline(1.0, color="#d62728", linewidth=1.5))
        ax.set_xlim(0, limit)
        ax.set_title(title)
        ax.set_xlabel(f"speed-up over {baseline_name} (higher is better)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(workloads)), workloads)
    axes[0][0].set_ylim(len(workloads) - 0.5, -0.7)
    where = document.get("gpu") or document.get("device", "")
    if where == "cpu" and document.get("threads"):
        where = f"the CPU ({document['threads']} threads)"
    queue = document.get("queue")
    timing = ""
    if str(document.get("device", "")).startswith("cuda") and queue:
        timing = f", {queue} calls queued per sample" if queue > 1 else ", synchronised calls"
    fig.suptitle(f"roi_pool on {where}, {dtype}{timing}: speed-up over {baseline_name}")
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncol=min(len(handles), 6),
        frameon=False,
        title="floor Nx: the speed-up of a call that moved only the bytes it must, at the "
        "measured copy bandwidth",
        title_fontsize=7,
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_file(json_path: str | Path, png_path: str | Path, dtype: str | None = None) -> Path:
    """`plot_results` for a JSON file written by ``python -m roi_ops bench --json``."""
    return plot_results(json.loads(Path(json_path).read_text()), png_path, dtype)
