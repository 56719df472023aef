"""Per-call time of small roi_pool problems: the numba backend against torchvision on the CPU.

    PYTHONPATH=$PWD:$PWD/backends/numba .venv-tv/bin/python \\
        backends/numba/tools/percall.py [--threads 2] [--busy 1] [--channels 256 16]

For each small problem (N=2, C channels, a 50x68 map at stride 16, 16 ROIs, 7x7, float32 by
default) it times, call by call:

- ``numba infer`` / ``numba fwd``: the backend's forward alone (outputs freshly allocated, as the
  core does), without and with the argmax; ``numba bwd``: its backward alone;
- ``roi_ops infer`` / ``roi_ops fwd+bwd``: ``roi_ops.roi_pool(..., backend="numba")`` at default
  settings (the whole call path: validation, value checks, dispatch, autograd);
- ``tv infer`` / ``tv fwd+bwd``: ``torchvision.ops.roi_pool`` (when torchvision is installed).

It prints the median and the 10th-90th percentile range of the wall time in microseconds, and
the median CPU time of the calling thread (a serial call whose wall time is far above its CPU
time was descheduled by the OS; a parallel one may also have waited for a pool thread).
``--serial-work 0`` makes every numba call parallel (to compare threading layers, set
``NUMBA_THREADING_LAYER``). ``--busy N`` starts N
processes that each keep a core busy (``while True: pass``) for the whole run, as another
program on the machine would, and stops them at the end; numba calls that wake a thread pool
stall there for a scheduler time slice.

Without the plugin's entry point (a venv where only the source is on PYTHONPATH) the backend is
registered in-process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from busy import busy_cores


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) of `samples`."""
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return statistics.median(ordered), pick(0.1), pick(0.9)


CPU_SAMPLES: dict[int, list[float]] = {}


def time_calls(fn: Callable[[], object], reps: int, warmup: int = 20) -> list[float]:
    """Wall microseconds of each of `reps` calls of `fn`, after `warmup` untimed calls; the
    calling thread's CPU microseconds of each go to ``CPU_SAMPLES[id(wall samples)]``."""
    for _ in range(warmup):
        fn()
    samples, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
        cpu.append((time.thread_time() - start_cpu) * 1e6)
    CPU_SAMPLES[id(samples)] = cpu
    return samples


def make_problem(channels: int, num_rois: int, dtype: torch.dtype, seed: int = 0):
    """(input, rois): N=2, `channels`, a 50x68 map, `num_rois` boxes of 16-512 image px."""
    from roi_ops.bench.workloads import Workload, make_input, make_rois

    w = Workload("small", 2, channels, 50, 68, num_rois, 7, 1 / 16, 16, 512)
    return make_input(w, dtype, "cpu", seed), make_rois(w, dtype, "cpu", seed)


def ensure_numba_registered() -> None:
    import roi_ops

    from roi_ops_numba import NumbaBackend

    if "numba" not in {info.name for info in roi_ops.list_backends()}:
        roi_ops.register_backend(NumbaBackend)


def measure(channels: int, num_rois: int, reps: int, tuning) -> dict[str, list[float]]:
    """Samples (us) of every timed call for one problem."""
    import roi_ops
    from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem

    from roi_ops_numba import NumbaBackend

    backend = NumbaBackend(tuning)
    x, rois = make_problem(channels, num_rois, torch.float32)
    size, scale = 7, 1 / 16
    leaf = x.clone().requires_grad_(True)
    results: dict[str, list[float]] = {}

    def backend_forward(needs_argmax: bool) -> Callable[[], object]:
        def call():
            problem = RoIPoolProblem(x, rois, size, size, scale, needs_argmax)
            output = torch.empty(problem.output_shape, dtype=x.dtype)
            argmax = torch.empty(problem.output_shape, dtype=torch.int32) if needs_argmax else None
            backend.forward(problem, output, argmax)

        return call

    results["numba infer"] = time_calls(backend_forward(False), reps)
    results["numba fwd"] = time_calls(backend_forward(True), reps)
    problem = RoIPoolProblem(x, rois, size, size, scale, True)
    argmax = torch.empty(problem.output_shape, dtype=torch.int32)
    backend.forward(problem, torch.empty(problem.output_shape), argmax)
    grad = torch.randn(problem.output_shape)
    results["numba bwd"] = time_calls(
        lambda: backend.backward(
            RoIPoolBackwardProblem(grad, argmax, rois, tuple(x.shape), x.dtype)
        ),
        reps,
    )

    def roi_ops_infer():
        with torch.no_grad():
            roi_ops.roi_pool(x, rois, size, scale, backend="numba")

    def roi_ops_train():
        roi_ops.roi_pool(leaf, rois, size, scale, backend="numba").sum().backward()

    results["roi_ops infer"] = time_calls(roi_ops_infer, reps)
    results["roi_ops fwd+bwd"] = time_calls(roi_ops_train, reps)
    try:
        from torchvision.ops import roi_pool as tv_roi_pool
    except ImportError:
        return results

    def tv_infer():
        with torch.no_grad():
            tv_roi_pool(x, rois, size, scale)

    def tv_train():
        tv_roi_pool(leaf, rois, size, scale).sum().backward()

    results["tv infer"] = time_calls(tv_infer, reps)
    results["tv fwd+bwd"] = time_calls(tv_train, reps)
    return results


def threading_layer() -> str:
    """numba's threading layer, or "none" when no parallel kernel has run in this process."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        return "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--channels", type=int, nargs="+", default=[256, 16])
    parser.add_argument("--rois", type=int, nargs="+", default=[16])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--busy", type=int, default=0, help="processes that keep a core busy")
    parser.add_argument(
        "--serial-work",
        type=int,
        default=None,
        help="the backend's tuning.serial_work for the 'numba' rows (0: always parallel)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ensure_numba_registered()
    from dataclasses import replace

    import numba

    from roi_ops_numba.tuning import DEFAULT_TUNING

    tuning = DEFAULT_TUNING
    if args.serial_work is not None:
        tuning = replace(DEFAULT_TUNING, serial_work=args.serial_work)

    print(
        f"torch {torch.__version__}, numba {numba.__version__}, {args.threads} threads, "
        f"{args.busy} busy processes"
    )
    with busy_cores(args.busy) as busy:
        if busy:
            time.sleep(0.5)
        for channels in args.channels:
            for num_rois in args.rois:
                results = measure(channels, num_rois, args.reps, tuning)
                print(f"threading layer: {threading_layer()}")
                print(
                    f"N=2 C={channels} 50x68 K={num_rois} 7x7 float32, us per call: wall median "
                    "(p10, p90), and the calling thread's CPU median"
                )
                for name, samples in results.items():
                    median, low, high = percentiles(samples)
                    cpu = statistics.median(CPU_SAMPLES[id(samples)])
                    print(
                        f"  {name:16s} {median:8.1f}  (p10 {low:7.1f}, p90 {high:8.1f})"
                        f"  cpu {cpu:8.1f}"
                    )
                ratio = [
                    (mine, theirs)
                    for mine, theirs in (
                        ("roi_ops infer", "tv infer"),
                        ("roi_ops fwd+bwd", "tv fwd+bwd"),
                    )
                    if theirs in results
                ]
                for mine, theirs in ratio:
                    a = statistics.median(results[mine])
                    b = statistics.median(results[theirs])
                    print(f"  {mine} / {theirs}: {a / b:.2f}x")


if __name__ == "__main__":
    main()
