"""Where a numba forward's time goes on the CPU: fresh output buffers vs the kernel.

    python scripts/cpu_breakdown.py --threads 16 --workload mask-14 fpn-p2 [--backward]

For each full-size float32 workload: allocating and first-touching the output and argmax buffers
(as every call does), the numba forward into already-touched buffers (and how much of it staging
the NCHW input takes), the whole `roi_pool` call,
and torchvision's forward when it is installed; with --backward also a fresh grad_input
first-touched, the numba backward and torchvision's backward op. Medians of a few runs; prints
the machine's transparent-huge-page setting, which decides how many page faults a fresh buffer
costs.
"""

from __future__ import annotations

import argparse
import os
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


def breakdown(name: str, reps: int, tv, backward: bool) -> dict[str, float]:
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
    staging = staging_only(problem, out, arg)
    if staging is not None:
        row["of which staging"] = median_ms(staging, reps)
    with value_checks(False):
        row["roi_pool fwd"] = median_ms(
            lambda: roi_pool(leaf, rois, size, scale, backend="numba"), reps
        )
    if tv is not None:
        row["torchvision fwd"] = median_ms(lambda: tv(leaf, rois, size, scale), max(1, reps - 1))
    if backward:
        row.update(backward_parts(x, rois, w, reps))
    return row


def staging_only(problem: RoIPoolProblem, out: torch.Tensor, arg: torch.Tensor):
    """A call of the staged NCHW forward that stages every task's region and pools nothing
    (each group keeps its region, loses its ROIs), or None when `problem` takes another path."""
    from roi_ops_numba import kernels, ops

    x = problem.input
    c, w = x.shape[1], x.shape[3]
    geometry = ops.bin_geometry(problem)
    threads = ops.num_threads()
    plan = ops._group_plan(geometry, c, x.element_size(), threads, True)
    if x.stride(1) == 1 or x.dtype not in (torch.float32, torch.float64) or plan is None:
        return None
    order, groups, block = plan
    groups = groups.copy()
    groups[:, 2] = groups[:, 1]  # no ROIs
    areas = (groups[:, 4] - groups[:, 3]) * (groups[:, 6] - groups[:, 5])
    scratch = torch.zeros((threads, int(areas.max()) * block), dtype=x.dtype).numpy()
    src = ops.flat_storage(x)

    def run():
        with ops._parallel_region(threads):
            kernels.pool_forward_groups(
                src, *x.stride(), c, w, order, groups, *geometry[1:],
                out.view(-1).numpy(), arg.view(-1).numpy(), True, block, scratch,
            )  # fmt: skip

    return run


def backward_parts(x, rois, w, reps: int) -> dict[str, float]:
    """The backward's share: a fresh grad_input buffer first-touched, the numba backward (fresh
    buffer included) and torchvision's backward op when it is installed."""
    from roi_ops_numba import ops

    from roi_ops.ops import batch_indices, roi_pool_forward

    size, scale = w.output_size, w.spatial_scale
    with value_checks(False):
        _, argmax = roi_pool_forward(x, rois, size, size, scale, "numba", True)
    grad = torch.randn(argmax.shape)
    index = batch_indices(rois, x.shape[0])
    shape = tuple(x.shape)

    def fresh_grad_input():
        result = torch.empty(shape)
        ops._advise_tensor(result)
        result.fill_(0.0)

    row = {
        "fresh grad_input": median_ms(fresh_grad_input, reps),
        "numba bwd": median_ms(lambda: ops.backward(grad, argmax, index, shape, x.dtype), reps),
    }
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return row
    _, tv_argmax = torch.ops.torchvision.roi_pool(x, rois, scale, size, size)
    op = torch.ops.torchvision._roi_pool_backward
    n, c, h, wd = shape
    row["torchvision bwd"] = median_ms(
        lambda: op(grad, rois, tv_argmax, scale, size, size, n, c, h, wd), max(1, reps - 1)
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workload", nargs="+", default=["mask-14", "fpn-p2"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="time the backward's parts too")
    args = parser.parse_args()
    # As `python -m roi_ops bench --threads` does: numba's pool is sized before the plugin
    # imports numba (torch's setting alone was reset to 16 threads once another library
    # initialised OpenMP, so a "one-thread" breakdown ran on all cores).
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    setting = thp.read_text().strip() if thp.exists() else "?"
    print(f"threads {args.threads}  transparent huge pages: {setting}")
    try:
        from torchvision.ops import roi_pool as tv
    except ImportError:
        tv = None
    for name in args.workload:
        row = breakdown(name, args.reps, tv, args.backward)
        print(name, "  ".join(f"{k}: {v:.1f} ms" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
