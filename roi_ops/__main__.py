"""Command line: ``python -m roi_ops info`` and ``python -m roi_ops bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _progress(total: int):
    state = {"done": 0}
    interactive = sys.stderr.isatty()

    def report(label: str) -> None:
        state["done"] += 1
        width = 30
        filled = min(width, width * state["done"] // max(total, 1))
        text = f"[{'#' * filled}{'.' * (width - filled)}] {state['done']}/{total} {label}"
        if interactive:
            sys.stderr.write("\r" + text.ljust(100))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    return report


def _bench(args: argparse.Namespace) -> int:
    from .bench.runner import (
        MODES,
        format_table,
        resolve_workloads,
        run_benchmark,
        to_json,
        value_check_cost_ms,
    )
    from .registry import list_backends

    device = torch.device(args.device)
    if args.threads:
        # numba's pool must be sized before the plugin imports numba; torch's OpenMP setting
        # alone can be reset when another library initialises OpenMP.
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    workloads = resolve_workloads(args.workload, device, args.full_size)
    dtypes = [DTYPES[d] for d in args.dtype]
    backends = args.backend
    estimated = len(workloads) * len(dtypes) * (len(backends or list_backends()) + 1) * len(MODES)
    budget = args.budget if args.budget else (0.5 if device.type == "cpu" else 0.25)
    modes = tuple(args.mode) if args.mode else MODES
    results, bandwidth = run_benchmark(
        device,
        dtypes,
        workloads,
        backends,
        budget,
        channels_last=args.channels_last,
        progress=_progress(estimated),
        min_reps=args.min_reps,
        modes=modes,
        queue=args.queue,
    )
    sys.stderr.write("\n")
    check_ms = value_check_cost_ms(device, workloads[0], budget)
    print(
        f"device {device}  threads {torch.get_num_threads()}  copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s  layout "
        f"{'channels_last' if args.channels_last else 'contiguous'}"
        + (f"  queue {args.queue}" if device.type == "cuda" else "")
    )
    for w in workloads:
        print(f"  {w.name}: {w.describe()}")
    print(format_table(results))
    print(
        f"value checks ({workloads[0].name}, K={workloads[0].num_rois}): {check_ms:.3f} ms "
        "median per call (disabled while timing the table)"
    )
    extra = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "value_check_ms": check_ms,
        "queue": args.queue,
        "command": " ".join(["python -m roi_ops", *sys.argv[1:]]),
    }
    if device.type == "cuda":
        extra["gpu"] = torch.cuda.get_device_name(device)
    document = to_json(results, bandwidth, extra)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        from .bench.plot import plot_results

        measured = {r.dtype for r in results if not r.error}
        for dtype in [d for d in args.dtype if d in measured]:
            path = args.plot if len(args.dtype) == 1 else args.plot.replace(".png", f"-{dtype}.png")
            print(f"wrote {plot_results(document, path, dtype)}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .bench.plot import plot_file

    print(f"wrote {plot_file(args.json, args.png, args.dtype)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roi_ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and what auto picks")
    bench = sub.add_parser("bench", help="time every usable backend side by side")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    bench.add_argument(
        "--workload",
        nargs="+",
        default=None,
        help="frcnn-c4 fpn-p2 fpn-p4 mask-14 big-batch (default: all)",
    )
    bench.add_argument(
        "--backend",
        nargs="+",
        default=None,
        help="backend names, and 'torchvision' (default: every usable one)",
    )
    bench.add_argument("--channels-last", action="store_true")
    bench.add_argument("--threads", type=int, default=0, help="torch/numba threads (CPU)")
    bench.add_argument(
        "--budget", type=float, default=0.0, help="seconds of repeats per measurement"
    )
    bench.add_argument(
        "--full-size",
        action="store_true",
        help="on the CPU, use the GPU-sized workloads instead of scaled-down ones",
    )
    bench.add_argument("--min-reps", type=int, default=3, help="timed repeats at least")
    bench.add_argument(
        "--queue",
        type=int,
        default=1,
        help="CUDA: calls queued back to back per timed sample (1: one synchronised call, so "
        "host overhead counts; 10: steady cost per call with the host running ahead)",
    )
    bench.add_argument("--mode", nargs="+", default=None, choices=["infer", "fwd", "fwd+bwd"])
    bench.add_argument("--json", default=None, metavar="PATH", help="write raw medians here")
    bench.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="write a PNG chart (one per dtype: -DTYPE.png when several)",
    )
    plot = sub.add_parser("plot", help="chart a JSON file written by bench --json")
    plot.add_argument("json")
    plot.add_argument("png")
    plot.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import info_text

        print(info_text())
        return 0
    if args.command == "plot":
        return _plot(args)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
