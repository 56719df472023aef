"""The numba backend against torchvision on every bench workload, calls interleaved.

    PYTHONPATH=$PWD:$PWD/backends/numba .venv-tv/bin/python \\
        backends/numba/tools/vs_torchvision.py --threads 2 [--full-size] [--cpu-time]

For each workload (scaled down for the CPU unless --full-size, float32, NCHW unless
--channels-last) and mode (``infer``: no gradient; ``fwd``: forward with the argmax; ``f+b``:
forward and backward), it alternates one ``roi_ops.roi_pool(..., backend="numba")`` call at
default settings with one ``torchvision.ops.roi_pool`` call, so that both see the same load on a
shared machine, and prints the median and the minimum of each and the ratio of the medians
(torchvision's time over numba's: higher is faster). ``--cpu-time`` times the calling thread's
CPU time instead of the wall clock: with --threads 1 that is the cost of the call even while
other processes take the cores (with more threads it misses the other threads' work).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def ensure_numba_registered() -> None:
    import roi_ops

    from roi_ops_numba import NumbaBackend

    if "numba" not in {info.name for info in roi_ops.list_backends()}:
        roi_ops.register_backend(NumbaBackend)


def calls(workload, mode: str, channels_last: bool):
    """(numba call, torchvision call) for one workload and mode."""
    import roi_ops
    from roi_ops.bench.workloads import make_input, make_rois
    from torchvision.ops import roi_pool as tv_roi_pool

    x = make_input(workload, torch.float32, "cpu", channels_last=channels_last)
    rois = make_rois(workload, torch.float32, "cpu")
    size, scale = workload.output_size, workload.spatial_scale
    leaf = x.clone().requires_grad_(True)
    grad = None

    def run(pool):
        nonlocal grad
        if mode == "infer":
            with torch.no_grad():
                return pool(x, rois, size, scale)
        out = pool(leaf, rois, size, scale)
        if mode == "f+b":
            grad = torch.ones_like(out) if grad is None else grad
            out.backward(grad)
            leaf.grad = None
        return out

    def numba_pool(*arguments):
        return roi_ops.roi_pool(*arguments, backend="numba")

    return (lambda: run(numba_pool)), (lambda: run(tv_roi_pool))


def interleaved(first, second, reps: int, clock) -> tuple[list[float], list[float]]:
    """Milliseconds of `reps` calls of each, alternating, after one warm-up call each."""
    first()
    second()
    a, b = [], []
    for _ in range(reps):
        for fn, samples in ((first, a), (second, b)):
            start = clock()
            fn()
            samples.append((clock() - start) * 1e3)
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--cpu-time", action="store_true", help="thread CPU time, not wall")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--workload", nargs="+", default=None)
    parser.add_argument("--mode", nargs="+", default=["infer", "fwd", "f+b"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ensure_numba_registered()
    from roi_ops.bench.workloads import WORKLOADS

    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(
        f"torch {torch.__version__}, {args.threads} threads, "
        f"{'full-size' if args.full_size else 'CPU-scaled'}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}, float32, "
        f"{'thread CPU' if args.cpu_time else 'wall'} ms, {args.reps} interleaved calls each"
    )
    header = ("workload", "mode", "numba med", "min", "tv med", "min")
    print("{:11s} {:5s} {:>10s} {:>8s} {:>9s} {:>8s}  tv/numba".format(*header))
    for name in args.workload or list(WORKLOADS):
        workload = WORKLOADS[name]
        if not args.full_size:
            workload = workload.scaled_for_cpu()
        for mode in args.mode:
            mine, theirs = calls(workload, mode, args.channels_last)
            a, b = interleaved(mine, theirs, args.reps, clock)
            ma, mb = statistics.median(a), statistics.median(b)
            print(
                f"{name:11s} {mode:5s} {ma:10.2f} {min(a):8.2f} {mb:9.2f} {min(b):8.2f}  "
                f"{mb / ma:6.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
