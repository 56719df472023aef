"""Where a small CUDA call's host time goes: each step of roi_ops' call path timed on its own,
beside whole calls of roi_ops and torchvision, rows sampled in turn (medians, microseconds).

    python backends/cupy/tools/host_budget.py [--budget 0.4] [--profile]

`--profile` adds cProfile's view (own time per function) of forward and forward+backward calls.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import roi_ops
import torch
from roi_ops import autograd, bad_rois, execute, functional
from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem
from roi_ops.bench.runner import interleaved_host_us
from roi_ops.bench.workloads import SMALL_PROBLEM, make_input, make_rois
from roi_ops.dispatch import resolve_backend


def calls(device: torch.device) -> dict[str, object]:
    """Label -> a callable of no arguments, whole calls first, then the steps of one call."""
    workload = SMALL_PROBLEM
    size, scale = workload.output_size, workload.spatial_scale
    x = make_input(workload, torch.float32, device)
    rois = make_rois(workload, torch.float32, device)
    leaf = x.detach().requires_grad_(True)
    problem = RoIPoolProblem(x, rois, size, size, scale, True)
    inference = RoIPoolProblem(x, rois, size, size, scale, False)
    backend = resolve_backend("auto", problem)
    shape = problem.output_shape
    output = torch.empty(shape, device=device)
    argmax = torch.empty(shape, dtype=torch.int32, device=device)
    problem.bad_roi_log = inference.bad_roi_log = bad_rois.cuda_kernel_log(device)
    backend.forward(problem, output, argmax)
    grad = torch.randn(shape, device=device)
    backward = RoIPoolBackwardProblem(grad, argmax, rois, tuple(x.shape), x.dtype)

    def whole(pool, mode):
        if mode == "infer":

            def infer():
                with torch.no_grad():
                    return pool(x, rois, size, scale)

            return infer
        if mode == "fwd":
            return lambda: pool(leaf, rois, size, scale)

        def forward_backward():
            leaf.grad = None
            pool(leaf, rois, size, scale).backward(grad)

        return forward_backward

    table: dict[str, object] = {}
    try:
        from torchvision.ops import roi_pool as tv_pool
    except ImportError:
        tv_pool = None
    for mode in ("infer", "fwd", "f+b"):
        if tv_pool is not None:
            table[f"torchvision {mode}"] = whole(tv_pool, mode)
        table[f"roi_ops {mode}"] = whole(roi_ops.roi_pool, mode)

    class Trivial(torch.autograd.Function):
        @staticmethod
        def forward(ctx, input):
            return output

        @staticmethod
        def backward(ctx, grad_output):
            return None

    table.update(
        {
            "step _prepare": lambda: functional._prepare(x, rois, size, scale, "auto"),
            "step plain_eager": lambda: autograd.plain_eager(x, rois),
            "step raise_pending": lambda: bad_rois.raise_pending(device),
            "step RoIPoolProblem": lambda: RoIPoolProblem(x, rois, size, size, scale, True),
            "step resolve_backend": lambda: resolve_backend("auto", problem),
            "step start_value_checks": lambda: execute.start_value_checks(
                True, rois, x.shape[0], device
            ),
            "step torch.empty": lambda: torch.empty(shape, device=device),
            "step finish_value_checks": lambda: execute.finish_value_checks(None, device),
            "step record_owner": lambda: execute.record_owner(argmax, backend),
            "step backend.forward infer": lambda: backend.forward(inference, output, None),
            "step backend.forward argmax": lambda: backend.forward(problem, output, argmax),
            "step run_forward infer": lambda: execute.run_forward(
                RoIPoolProblem(x, rois, size, size, scale, False), "auto"
            ),
            "step run_forward argmax": lambda: execute.run_forward(
                RoIPoolProblem(x, rois, size, size, scale, True), "auto"
            ),
            "step Function.apply (trivial)": lambda: Trivial.apply(leaf),
            "step backend.backward": lambda: backend.backward(backward),
            "step run_backward": lambda: execute.run_backward(
                grad, rois, argmax, tuple(x.shape), x.dtype, False, "auto"
            ),
            "step torch.zeros (input)": lambda: torch.zeros(x.shape, device=device),
            "step aten fill_ (launch)": lambda: output.fill_(0.0),
        }
    )
    return table


def profile(fn, label: str, count: int = 3000) -> None:
    """cProfile's own-time table of `count` calls of `fn`."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    print(f"\n== cProfile, {label}, {count} calls (own time, inflated by profiling)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per row")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    table = calls(device)
    labels = list(table)
    timings = interleaved_host_us([table[label] for label in labels], device, args.budget)
    print(f"host microseconds per call, {SMALL_PROBLEM.describe()}, float32")
    for label, timing in zip(labels, timings, strict=True):
        print(f"{label:34s} {timing.median:8.1f}  [{timing.q1:.1f}, {timing.q3:.1f}]")
    if args.profile:
        profile(table["roi_ops fwd"], "roi_ops fwd")
        profile(table["roi_ops f+b"], "roi_ops f+b")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
