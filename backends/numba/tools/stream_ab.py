"""Streamed (non-temporal) output stores against plain ones, in whole roi_pool calls.

    python backends/numba/tools/stream_ab.py --threads 2 --workload frcnn-c4 many-small
    python backends/numba/tools/stream_ab.py --mode infer --consume   # a reader after the call

Each round runs, one after another in one process: the numba backend with plain stores
(`stream_min_bytes` raised past every output), the same backend streaming (its default tuning),
and torchvision's op. Calls are whole `roi_pool` calls at default settings on full-size float32
workloads, so each one allocates and first-touches fresh outputs as users' calls do. ``--mode``:
``fwd`` (a gradient is needed, so the argmax is written), ``infer`` or ``fwd+bwd`` (the backward
itself stores plainly either way). ``--consume`` sums the output after each call, so a cost
moved to the output's next reader shows. Prints median wall milliseconds with quartiles and the
ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from roi_ops import roi_pool
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois
from roi_ops.registry import REGISTRY


def numba_backend():
    """The registered numba backend instance (its tuning is swapped between calls)."""
    entry = REGISTRY.get("numba")
    if entry is None or REGISTRY.availability(entry) is not None:
        raise SystemExit("the numba backend is not available")
    return entry.backend


def make_call(pool: Callable, x, rois, size: int, scale: float, mode: str, consume: bool):
    """One call of `pool` in `mode`, the way a user's code makes it."""
    leaf = x.clone().requires_grad_(mode != "infer")
    grad = None

    def call():
        nonlocal grad
        if mode == "infer":
            with torch.no_grad():
                out = pool(leaf, rois, size, scale)
        else:
            out = pool(leaf, rois, size, scale)
        if consume:
            out.detach().sum()
        if mode == "fwd+bwd":
            if grad is None:
                grad = torch.randn(out.shape)
            leaf.grad = None
            out.backward(grad)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", choices=["fwd", "infer", "fwd+bwd"], default="fwd")
    parser.add_argument("--consume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = numba_backend()
    streamed = backend.tuning
    plain = dataclasses.replace(streamed, stream_min_bytes=2**62)
    try:
        import torchvision
    except ImportError:
        torchvision = None
    print(f"threads {args.threads}, mode {args.mode}, consume {args.consume}, float32, full size")
    for name in args.workload:
        w = WORKLOADS[name]
        x, rois = make_input(w, torch.float32, "cpu"), make_rois(w, torch.float32, "cpu")
        numba = make_call(
            lambda *a: roi_pool(*a, backend="numba"), x, rois, w.output_size, w.spatial_scale,
            args.mode, args.consume,
        )  # fmt: skip
        calls = {"plain": (plain, numba), "streamed": (streamed, numba)}
        if torchvision is not None:
            tv = make_call(torchvision.ops.roi_pool, x, rois, w.output_size, w.spatial_scale,
                           args.mode, args.consume)  # fmt: skip
            calls["torchvision"] = (None, tv)
        times: dict[str, list[float]] = {label: [] for label in calls}
        try:
            for tuning, call in calls.values():  # warm up
                backend.tuning = tuning or streamed
                call()
            for _ in range(args.rounds):
                for label, (tuning, call) in calls.items():
                    backend.tuning = tuning or streamed
                    for _ in range(1 if tuning is None else 3):
                        start = time.perf_counter()
                        call()
                        times[label].append((time.perf_counter() - start) * 1e3)
        finally:
            backend.tuning = streamed
        median = {label: statistics.median(v) for label, v in times.items()}
        cells = []
        for label, samples in times.items():
            q1, _, q3 = statistics.quantiles(samples) if len(samples) > 1 else (0, 0, 0)
            cells.append(f"{label} {median[label]:.1f} ms ({q1:.1f}-{q3:.1f})")
        ratios = f"plain/streamed {median['plain'] / median['streamed']:.3f}"
        if "torchvision" in median:
            ratios += (
                f", torchvision over plain {median['torchvision'] / median['plain']:.2f}x, "
                f"over streamed {median['torchvision'] / median['streamed']:.2f}x"
            )
        print(f"{name:<10} " + ", ".join(cells) + f"; {ratios}", flush=True)


if __name__ == "__main__":
    main()
