"""What fresh output pages cost a numba forward: the same call into touched outputs and into
freshly allocated ones, in alternating rounds.

    python backends/numba/tools/fresh_outputs.py --threads 2 --workload many-small frcnn-c4

For each full-size float32 workload (NCHW, with the argmax), `NumbaBackend.forward` into
outputs touched once before, into fresh ``torch.empty`` outputs (advised into transparent huge
pages, as the backend does), and into fresh outputs without that advice; each freed after its
call, outside the timing. Medians and ranges of the rounds. roi_ops reuses its large CPU outputs
across calls (`roi_ops.host_memory`), so a default call pays the touched figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from roi_ops.backend import RoIPoolProblem
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois


def measure(name: str, rounds: int) -> dict[str, list[float]]:
    from roi_ops_numba import NumbaBackend
    from roi_ops_numba.tuning import NumbaTuning

    w = WORKLOADS[name]
    x = make_input(w, torch.float32, "cpu")
    rois = make_rois(w, torch.float32, "cpu")
    size = w.output_size
    problem = RoIPoolProblem(x, rois, size, size, w.spatial_scale, True)
    shape = problem.output_shape
    advised, plain = NumbaBackend(), NumbaBackend(NumbaTuning(huge_page_min_bytes=1 << 62))
    out, arg = torch.ones(shape), torch.ones(shape, dtype=torch.int32)
    kept = []

    def fresh(backend):
        def run():
            kept.append((torch.empty(shape), torch.empty(shape, dtype=torch.int32)))
            backend.forward(problem, *kept[-1])

        return run

    calls = {
        "touched": lambda: advised.forward(problem, out, arg),
        "fresh, huge pages": fresh(advised),
        "fresh, 4 KiB pages": fresh(plain),
    }
    for call in calls.values():  # compile, warm
        call()
        kept.clear()
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            times[label].append((time.perf_counter() - start) * 1e3)
            kept.clear()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workload", nargs="+", default=["many-small", "frcnn-c4"],
                        choices=list(WORKLOADS))  # fmt: skip
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, {args.rounds} alternating rounds, ms per forward call")
    for name in args.workload:
        cells = []
        for label, samples in measure(name, args.rounds).items():
            cells.append(f"{label} {statistics.median(samples):.1f} "
                         f"({min(samples):.1f}-{max(samples):.1f})")  # fmt: skip
        print(f"{name}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
