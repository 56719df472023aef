"""Where a numba forward's time goes on the CPU: fresh output buffers vs the kernel.

    python scripts/cpu_breakdown.py --threads 16 --workload mask-14 fpn-p2

For each full-size float32 workload: allocating and first-touching the output and argmax buffers
(as every call does), the numba forward into already-touched buffers, the whole `roi_pool` call,
and torchvision's forward when it is installed. Medians of a few runs; prints the machine's
transparent-huge-page setting, which decides how many page faults a fresh buffer costs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from roi_ops import roi_pool
from roi_ops.backend import RoIPoolProblem
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois
from roi_ops.config import value_checks


def median_ms(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def breakdown(name: str, reps: int, tv) -> dict[str, float]:
    """Median ms of each part for one full-size float32 workload."""
    from roi_ops_numba import ops

    w = WORKLOADS[name]
    x = make_input(w, torch.float32, "cpu")
    rois = make_rois(w, torch.float32, "cpu")
    size, scale = w.output_size, w.spatial_scale
    problem = RoIPoolProblem(x, rois, size, size, scale, True)
    shape = problem.output_shape

    def fresh_buffers():
        out = torch.empty(shape)
        arg = torch.empty(shape, dtype=torch.int32)
        ops._advise_tensor(out)
        ops._advise_tensor(arg)
        out.fill_(0.0)
        arg.fill_(0)

    out = torch.zeros(shape)
    arg = torch.zeros(shape, dtype=torch.int32)
    leaf = x.clone().requires_grad_(True)
    row = {
        "fresh buffers": median_ms(fresh_buffers, reps),
        "kernel, touched buffers": median_ms(lambda: ops.forward(problem, out, arg), reps),
    }
    with value_checks(False):
        row["roi_pool fwd"] = median_ms(
            lambda: roi_pool(leaf, rois, size, scale, backend="numba"), reps
        )
    if tv is not None:
        row["torchvision fwd"] = median_ms(lambda: tv(leaf, rois, size, scale), max(1, reps - 1))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workload", nargs="+", default=["mask-14", "fpn-p2"])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    setting = thp.read_text().strip() if thp.exists() else "?"
    print(f"threads {args.threads}  transparent huge pages: {setting}")
    try:
        from torchvision.ops import roi_pool as tv
    except ImportError:
        tv = None
    for name in args.workload:
        row = breakdown(name, args.reps, tv)
        print(name, "  ".join(f"{k}: {v:.1f} ms" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
