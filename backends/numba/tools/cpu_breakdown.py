"""Where a numba forward's time goes on the CPU: fresh output buffers vs the kernel.

    python backends/numba/tools/cpu_breakdown.py --threads 16 --workload mask-14 fpn-p2 [--backward]

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

import numpy as np
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
    from roi_ops_numba import NumbaBackend
    from roi_ops_numba.memory import advise_tensor

    backend = NumbaBackend()
    huge = backend.tuning.huge_page_min_bytes
    w = WORKLOADS[name]
    x = make_input(w, torch.float32, "cpu")
    rois = make_rois(w, torch.float32, "cpu")
    size, scale = w.output_size, w.spatial_scale
    problem = RoIPoolProblem(x, rois, size, size, scale, True)
    shape = problem.output_shape

    def fresh_buffers():
        out = torch.empty(shape)
        arg = torch.empty(shape, dtype=torch.int32)
        advise_tensor(out, huge)
        advise_tensor(arg, huge)
        out.fill_(0.0)
        arg.fill_(0)

    out = torch.zeros(shape)
    arg = torch.zeros(shape, dtype=torch.int32)
    leaf = x.clone().requires_grad_(True)
    row = {
        "fresh buffers": median_ms(fresh_buffers, reps),
        "kernel, touched buffers": median_ms(lambda: backend.forward(problem, out, arg), reps),
    }
    staging = staging_only(problem, out, arg, backend.tuning)
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


def staging_only(problem: RoIPoolProblem, out: torch.Tensor, arg: torch.Tensor, tuning):
    """A call of the staged NCHW forward that stages every task's region and pools nothing
    (each group keeps its region, loses its ROIs), or None when `problem` takes another path."""
    from roi_ops_numba import ops, pool_groups
    from roi_ops_numba.memory import flat_storage

    x = problem.input
    c, h = x.shape[1], x.shape[2]
    if x.stride(1) == 1 or x.dtype not in (torch.float32, torch.float64):
        return None
    call = ops.PoolCall(problem)
    geometry = ops.BinGeometry(call, 1)
    threads = ops.num_threads()
    t = tuning
    order, groups, block, size = pool_groups.plan_groups(
        geometry.source, *geometry.edges(), h, c, x.element_size(), threads, True,
        t.tasks_per_thread, t.min_block, t.max_block, t.task_output_bytes, t.stage_min_coverage,
        t.stage_min_block, t.stage_task_bytes, t.stage_max_bytes,
    )  # fmt: skip
    if block == 0:
        return None
    groups = groups.copy()
    groups[:, 2] = groups[:, 1]  # no ROIs
    scratch = torch.zeros((threads, size), dtype=x.dtype).numpy()
    src = flat_storage(x)
    layout = call.layout

    def run():
        with ops.parallel_region(threads):
            pool_groups.pool_groups_parallel(
                src, layout, x.shape[0], c, geometry.source, order, groups, *geometry.edges(),
                out.view(-1).numpy(), arg.view(-1).numpy(), True, block, scratch, False,
                np.empty(0, np.int16), np.empty(0, np.int16), 0,
            )  # fmt: skip

    return run


def backward_parts(x, rois, w, reps: int) -> dict[str, float]:
    """The backward's share: a fresh grad_input buffer first-touched, the numba backward (fresh
    buffer included) and torchvision's backward op when it is installed."""
    from roi_ops.backend import RoIPoolBackwardProblem

    from roi_ops_numba import NumbaBackend
    from roi_ops_numba.memory import advise_tensor

    backend = NumbaBackend()
    size, scale = w.output_size, w.spatial_scale
    problem = RoIPoolProblem(x, rois, size, size, scale, True)
    argmax = torch.empty(problem.output_shape, dtype=torch.int32)
    backend.forward(problem, torch.empty(problem.output_shape, dtype=x.dtype), argmax)
    grad = torch.randn(argmax.shape)
    shape = tuple(x.shape)

    def fresh_grad_input():
        result = torch.empty(shape)
        advise_tensor(result, backend.tuning.huge_page_min_bytes)
        result.fill_(0.0)

    backward = RoIPoolBackwardProblem(grad, argmax, rois, shape, x.dtype)
    row = {
        "fresh grad_input": median_ms(fresh_grad_input, reps),
        "numba bwd": median_ms(lambda: backend.backward(backward), reps),
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
