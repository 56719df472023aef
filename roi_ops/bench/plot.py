"""Bar charts of benchmark medians (needs matplotlib): one panel per workload."""

from __future__ import annotations

import json
from pathlib import Path

PALETTE = {
    "triton": "#1f77b4",
    "cupy": "#2ca02c",
    "numba": "#9467bd",
    "torch": "#7f7f7f",
    "torchvision": "#d62728",
}
MODES = (("infer", "inference"), ("fwd", "forward"), ("fwd+bwd", "forward + backward"))


def plot_results(document: dict, path: str | Path, dtype: str | None = None) -> Path:
    """Write a PNG chart of `document` (the ``--json`` output) to `path`.

    One panel per workload; in each, groups of bars (one per mode) with one bar per backend,
    times in milliseconds on a log axis, and the bytes-moved floor of each mode as a dashed tick.
    `dtype` picks one dtype (default: the first in the results).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in document["results"] if not r.get("error")]
    if not results:
        raise ValueError("document: expected at least one successful measurement, got none")
    dtype = dtype or results[0]["dtype"]
    results = [r for r in results if r["dtype"] == dtype]
    if not results:
        raise ValueError(f"dtype: no successful measurement for {dtype!r}")
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    backends = list(dict.fromkeys(r["backend"] for r in results))
    modes = [(m, label) for m, label in MODES if any(m in r["times_ms"] for r in results)]
    fig, axes = plt.subplots(
        1, len(workloads), figsize=(3.4 * len(workloads) + 1, 4.2), squeeze=False
    )
    width = 0.8 / max(len(backends), 1)
    for ax, workload in zip(axes[0], workloads, strict=True):
        rows = {r["backend"]: r for r in results if r["workload"] == workload}
        for b, backend in enumerate(backends):
            row = rows.get(backend)
            if row is None:
                continue
            xs = [i + (b - (len(backends) - 1) / 2) * width for i in range(len(modes))]
            ys = [row["times_ms"].get(m, float("nan")) for m, _ in modes]
            ax.bar(xs, ys, width * 0.95, color=PALETTE.get(backend, None), label=backend)
        floor = next(iter(rows.values()))["floor_ms"]
        for i, (mode, _) in enumerate(modes):
            ax.hlines(
                floor[mode],
                i - 0.45,
                i + 0.45,
                colors="black",
                linestyles="dashed",
                linewidth=1.2,
                label="bytes-moved floor" if i == 0 else None,
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(modes)), [label for _, label in modes], rotation=20)
        ax.set_title(workload)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("median time per call (ms, log scale)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    device = document.get("device", "")
    fig.suptitle(f"roi_pool on {document.get('gpu', device)} ({dtype}); lower is better")
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_file(json_path: str | Path, png_path: str | Path, dtype: str | None = None) -> Path:
    """`plot_results` for a JSON file written by ``python -m roi_ops bench --json``."""
    return plot_results(json.loads(Path(json_path).read_text()), png_path, dtype)
