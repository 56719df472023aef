"""Where parallel numba kernels start to beat the serial ones: per-call time against the work.

    PYTHONPATH=$PWD:$PWD/backends/numba python backends/numba/tools/serial_threshold.py \\
        --threads 16 [--busy 1]

For problems of growing size (N=2, a 50x68 map, 7x7, float32 NCHW; C and K vary) it prints the
work estimate that `NumbaTuning.serial_work` is compared with (pixels scanned times channels
for the forward; planes zeroed plus gradients added for the backward) and the median and minimum
wall time of a forced-serial and a forced-parallel call. `serial_work` belongs where the
parallel median drops clearly below the serial one, on an idle machine and with ``--busy``
processes keeping cores busy (where a thread pool can stall a call).
"""

from __future__ import annotations

import argparse
import time

import torch
from busy import busy_cores

SIZES = [(16, 4), (16, 16), (64, 16), (256, 16), (256, 64), (256, 256), (1024, 256), (1024, 1024)]


def timed(fn, reps: int) -> tuple[float, float]:
    """(median, minimum) microseconds of `reps` calls after two warm-up calls."""
    fn()
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return samples[len(samples) // 2], samples[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--busy", type=int, default=0, help="processes that keep a core busy")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem
    from roi_ops.bench.workloads import Workload, make_input, make_rois

    from roi_ops_numba import NumbaBackend, ops
    from roi_ops_numba.tuning import NumbaTuning

    serial = NumbaBackend(NumbaTuning(serial_work=2**62))
    parallel = NumbaBackend(NumbaTuning(serial_work=0))
    with busy_cores(args.busy):
        print(f"{args.threads} threads, {args.busy} busy processes; us per call, median (min)")
        for channels, num_rois in SIZES:
            w = Workload("sweep", 2, channels, 50, 68, num_rois, 7, 1 / 16, 16, 512)
            x, rois = make_input(w, torch.float32, "cpu"), make_rois(w, torch.float32, "cpu")
            problem = RoIPoolProblem(x, rois, 7, 7, 1 / 16, True)
            work = ops.BinGeometry(ops.PoolCall(problem), 1).work * channels
            out = torch.empty(problem.output_shape)
            argmax = torch.empty(problem.output_shape, dtype=torch.int32)
            forward = [
                timed(lambda b=b, p=problem, o=out, a=argmax: b.forward(p, o, a), args.reps)
                for b in (serial, parallel)
            ]
            grad = torch.randn(problem.output_shape)
            back = RoIPoolBackwardProblem(grad, argmax, rois, tuple(x.shape), x.dtype)
            backward = [
                timed(lambda b=b, p=back: b.backward(p), args.reps) for b in (serial, parallel)
            ]
            back_work = x.numel() + out.numel()
            print(
                f"C={channels:4d} K={num_rois:4d}  fwd work {work:10d}: serial "
                f"{forward[0][0]:8.0f} ({forward[0][1]:7.0f}) parallel {forward[1][0]:8.0f} "
                f"({forward[1][1]:7.0f})  |  bwd work {back_work:9d}: serial {backward[0][0]:8.0f} "
                f"({backward[0][1]:7.0f}) parallel {backward[1][0]:8.0f} ({backward[1][1]:7.0f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
