"""Whole backward calls under several backward tunings, in alternating rounds.

    python backends/numba/tools/backward_tuning.py --threads 2 --workload many-small fpn-p4 \
        --block-kib 256 512 1024 --prefetch-bytes 0 2048 --tasks-per-thread 2 8

For each full-size float32 workload (NCHW): the forward once (for its argmax), then
`NumbaBackend.backward` with every combination of `backward_block_bytes` (KiB),
`backward_prefetch_bytes` (0: never prefetch) and `tasks_per_thread` (which bounds the blocks
from above when there are many threads), each call's result freed outside the timing.
Every combination must give the same bits (the sums' order does not depend on them); medians and
ranges of the rounds, with each task's block of channels and whether it prefetches.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import replace

import torch
from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois


def measure(name: str, tunings: dict, threads: int, rounds: int) -> dict[str, list[float]]:
    from roi_ops_numba import NumbaBackend, ops

    w = WORKLOADS[name]
    x = make_input(w, torch.float32, "cpu")
    rois = make_rois(w, torch.float32, "cpu")
    problem = RoIPoolProblem(x, rois, w.output_size, w.output_size, w.spatial_scale, True)
    output = torch.empty(problem.output_shape)
    argmax = torch.empty(problem.output_shape, dtype=torch.int32)
    NumbaBackend().forward(problem, output, argmax)
    grad_output = torch.randn(problem.output_shape, generator=torch.Generator().manual_seed(0))
    backward = RoIPoolBackwardProblem(grad_output, argmax, rois, tuple(x.shape), x.dtype)
    num_images, channels, height, width = x.shape
    bins = w.output_size**2
    backends, labels = {}, {}
    for label, tuning in tunings.items():
        block = ops._backward_block(num_images, channels, height * width * 4, threads, tuning)
        prefetching = block * bins * 4 <= tuning.backward_prefetch_bytes
        labels[label] = f"{label} ({block} ch{', prefetch' if prefetching else ''})"
        backends[label] = NumbaBackend(tuning)
    first = None
    for label, backend in backends.items():  # compile, warm, and check the bits
        grad = backend.backward(backward)
        first = grad if first is None else first
        assert torch.equal(grad.view(torch.int32), first.view(torch.int32)), label
        del grad
    del first
    times: dict[str, list[float]] = {labels[label]: [] for label in backends}
    for _ in range(rounds):
        for label, backend in backends.items():
            start = time.perf_counter()
            grad = backend.backward(backward)
            times[labels[label]].append((time.perf_counter() - start) * 1e3)
            del grad
    return times


def main() -> None:
    from roi_ops_numba.tuning import DEFAULT_TUNING

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workload", nargs="+", default=["many-small", "fpn-p4"],
                        choices=list(WORKLOADS))  # fmt: skip
    parser.add_argument("--block-kib", nargs="+", type=int,
                        default=[DEFAULT_TUNING.backward_block_bytes // 1024])  # fmt: skip
    parser.add_argument("--prefetch-bytes", nargs="+", type=int,
                        default=[DEFAULT_TUNING.backward_prefetch_bytes])  # fmt: skip
    parser.add_argument("--tasks-per-thread", nargs="+", type=int,
                        default=[DEFAULT_TUNING.tasks_per_thread])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tunings = {
        f"block {kib} KiB, prefetch <= {prefetch} B, {tasks} tasks a thread": replace(
            DEFAULT_TUNING,
            backward_block_bytes=kib * 1024,
            backward_prefetch_bytes=prefetch,
            tasks_per_thread=tasks,
        )
        for kib, prefetch, tasks in itertools.product(
            args.block_kib, args.prefetch_bytes, args.tasks_per_thread
        )
    }
    print(f"threads {args.threads}, {args.rounds} alternating rounds, ms per backward call")
    for name in args.workload:
        cells = [
            f"{label} {statistics.median(samples):.1f} ({min(samples):.1f}-{max(samples):.1f})"
            for label, samples in measure(name, tunings, args.threads, args.rounds).items()
        ]
        print(f"{name}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
