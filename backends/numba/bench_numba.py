"""Time the numba backend on a CPU-scaled frcnn-c4 workload (a stand-in until ``roi_ops bench``).

    python backends/numba/bench_numba.py [--threads 1 2] [--layout channels_last] [--compare]

Prints the median of several runs after a warm-up (which compiles the kernels or loads them from
the on-disk cache; its time is printed too). ``--compare`` also times roi_ops' ``torch`` backend
and the shared ``index_put_`` backward on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from roi_ops.backend import RoIPoolProblem

from roi_ops_numba import NumbaBackend


def make_workload(
    num_images: int,
    channels: int,
    height: int,
    width: int,
    num_rois: int,
    stride: int,
    dtype: torch.dtype,
    layout: str,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, rois): boxes with log-uniform sides in [16, 512] image pixels, inside the image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_images, channels, height, width, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    image = torch.tensor([width * stride, height * stride], dtype=torch.float64)
    log_lo, log_hi = torch.log(torch.tensor(16.0)), torch.log(torch.tensor(512.0))
    sides = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(num_rois, 2, generator=g))
    sides = torch.minimum(sides.double(), image)
    corner = torch.rand(num_rois, 2, generator=g, dtype=torch.float64) * (image - sides)
    batch = torch.randint(0, num_images, (num_rois, 1), generator=g).double()
    rois = torch.cat([batch, corner, corner + sides], dim=1).to(dtype)
    return x, rois


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` in seconds over `repeats` runs (after one untimed run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layout", choices=["contiguous", "channels_last"], default="contiguous")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shape", type=int, nargs=4, default=[2, 256, 38, 63], metavar="NCHW")
    parser.add_argument("--rois", type=int, default=128)
    parser.add_argument("--output-size", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compare", action="store_true", help="also time the torch backend")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    n, c, h, w = args.shape
    x, rois = make_workload(n, c, h, w, args.rois, 16, dtype, args.layout)
    size = args.output_size
    problem = RoIPoolProblem(x, rois, size, size, 1 / 16, needs_argmax=True)
    inference = RoIPoolProblem(x, rois, size, size, 1 / 16, needs_argmax=False)
    output = torch.empty(problem.output_shape, dtype=dtype)
    argmax = torch.empty(problem.output_shape, dtype=torch.int32)
    grad_output = torch.randn(problem.output_shape).to(dtype)
    batch = rois[:, 0].double().trunc().long()
    backend = NumbaBackend()

    def numba_backward() -> torch.Tensor:
        return backend.backward(grad_output, argmax, batch, tuple(x.shape), dtype)

    def numba_train() -> None:
        backend.forward(problem, output, argmax)
        numba_backward()

    start = time.perf_counter()
    backend.forward(problem, output, argmax)
    backend.forward(inference, output, None)
    numba_backward()
    first = time.perf_counter() - start
    print(
        f"workload: input {tuple(x.shape)} {args.dtype} {args.layout}, {args.rois} rois, "
        f"{size}x{size}, scale 1/16; first calls (compile or cache load): {first:.2f} s"
    )
    timings: dict[str, Callable[[], object]] = {
        "numba forward": lambda: backend.forward(problem, output, argmax),
        "numba forward (no argmax)": lambda: backend.forward(inference, output, None),
        "numba backward": numba_backward,
        "numba forward+backward": numba_train,
    }
    if args.compare:
        from roi_ops.ops import scatter_backward
        from roi_ops.torch_backend import TorchBackend

        torch_backend = TorchBackend()

        def shared_backward() -> torch.Tensor:
            return scatter_backward(grad_output, argmax, batch, tuple(x.shape), dtype)

        def torch_train() -> None:
            torch_backend.forward(problem, output, argmax)
            shared_backward()

        timings["shared index_put_ backward"] = shared_backward
        timings["torch forward"] = lambda: torch_backend.forward(problem, output, argmax)
        timings["torch forward+backward"] = torch_train

    previous = torch.get_num_threads()
    try:
        results = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            results[threads] = {k: median_time(fn, args.repeats) for k, fn in timings.items()}
    finally:
        torch.set_num_threads(previous)
    header = "".join(f"{f'{t} thread(s)':>14}" for t in args.threads)
    print(f"{'median time (ms)':<30}{header}")
    for name in timings:
        row = "".join(f"{results[t][name] * 1e3:>14.3f}" for t in args.threads)
        print(f"{name:<30}{row}")


if __name__ == "__main__":
    main()
