"""Command line: ``python -m roi_ops info``, ``python -m roi_ops bench`` and ``python -m roi_ops
plot``.

Every user mistake ends in one readable ``error:`` line and exit status 2 (1 when the work itself
failed), checked before any long work starts; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .config import VALUE_CHECKS_ENV
from .dispatch import BACKEND_ENV, LOG_ENV
from .host_memory import LIMIT_ENV
from .native import NATIVE_ENV

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
MODES = ("infer", "fwd", "fwd+bwd")
DEFAULT_QUEUE = 10
USAGE_ERROR = 2
FAILED = 1


class UsageError(Exception):
    """A mistake in the command line: printed as one line, exit status 2."""


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=1, cutoff=0.5)
    if not close:
        return ""
    match = next(k for k in known if k.lower() == close[0])
    return f"; did you mean {match!r}?"


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


# Argument checks (all before any timing) ----------------------------------------------------


def check_device(text: str) -> torch.device:
    """The --device argument as a torch.device this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: expected 'cpu' or 'cuda[:INDEX]', got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected 'cpu' or 'cuda[:INDEX]', got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UsageError(
                f"--device {text}: CUDA is not available here (torch {torch.__version__} is "
                f"{build}, and no GPU is visible); run it on a machine with an NVIDIA GPU and a "
                "CUDA build of torch, or use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    return device


def check_workloads(names: list[str] | None) -> list[str] | None:
    """The --workload names, unknown ones refused with the closest known name."""
    from .bench.pyramid import FPN_MULTI
    from .bench.workloads import WORKLOADS

    if names is None:
        return None
    known = [*WORKLOADS, FPN_MULTI.name]
    for name in names:
        if name not in known:
            raise UsageError(
                f"--workload: unknown workload {name!r}{_did_you_mean(name, known)} "
                f"(known: {', '.join(known)})"
            )
    return list(dict.fromkeys(names))


def check_backends(
    names: list[str] | None, device: torch.device, dtypes: list[torch.dtype]
) -> tuple[list[str] | None, list[str]]:
    """The --backend names, matched to registered names (case ignored), each one usable on
    `device` for at least one of `dtypes`; ``torchvision`` only when it imports.

    Returns (names or None for every usable backend, notes about dtypes a backend skips).
    """
    from .bench.runner import AUTO, TORCHVISION, torchvision_roi_pool, unusable_reasons
    from .registry import REGISTRY

    if names is None:
        return None, []
    known = [AUTO, *REGISTRY.names(), TORCHVISION]
    by_lower = {k.lower(): k for k in known}
    chosen: list[str] = []
    notes: list[str] = []
    where = f"on {device}"
    for given in names:
        name = by_lower.get(given.lower())
        if name is None:
            raise UsageError(
                f"--backend: unknown backend {given!r}{_did_you_mean(given, known)} "
                f"(known: {', '.join(known)}; `python -m roi_ops info` lists them)"
            )
        if name == TORCHVISION:
            if torchvision_roi_pool() is None:
                raise UsageError(
                    "--backend torchvision: torchvision cannot be imported here; install the "
                    f"torchvision release built for torch {torch.__version__.split('+')[0]}, or "
                    "leave torchvision out of --backend"
                )
        elif name != AUTO:
            per_dtype = {d: unusable_reasons(name, device, d) for d in dtypes}
            if all(per_dtype.values()):
                reasons = "; ".join(dict.fromkeys(r for rs in per_dtype.values() for r in rs))
                hint = (
                    " (use --device cuda on a GPU machine)"
                    if device.type == "cpu" and "cuda" in reasons.lower()
                    else ""
                )
                raise UsageError(
                    f"--backend {name}: cannot run {where}: {reasons}{hint}; "
                    "`python -m roi_ops info` shows what can run here"
                )
            for dtype, reasons in per_dtype.items():
                if reasons:
                    dtype_name = str(dtype).removeprefix("torch.")
                    notes.append(f"{name} skips {dtype_name} {where}: {'; '.join(reasons)}")
        chosen.append(name)
    return list(dict.fromkeys(chosen)), notes


def _check_output_path(option: str, path: str | None) -> None:
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {str(parent)!r} does not exist; create it")
    if Path(path).is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")


def check_matplotlib(option: str) -> None:
    """Refuse `option` (a chart) when matplotlib is missing, before any work."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            f"{option}: charts need matplotlib, which is not installed; run "
            '`pip install matplotlib` (or `pip install -e ".[plot]"` in the repository), or '
            "drop the chart and draw it later with `python -m roi_ops plot FILE.json CHART.png`"
        )


def chart_paths(path: str, dtypes: list[str]) -> dict[str, Path]:
    """One chart path per dtype: `path` itself for one dtype, else ``STEM-DTYPE.SUFFIX``."""
    base = Path(path)
    if len(dtypes) == 1:
        return {dtypes[0]: base}
    suffix = base.suffix or ".png"
    return {
        d: base.with_name(f"{base.stem if base.suffix else base.name}-{d}{suffix}") for d in dtypes
    }


def _positive(kind, name: str, minimum):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {name} >= {minimum}, got {text}")
        return value

    return parse


def _number_option(
    parser: argparse.ArgumentParser, flag: str, kind: type, minimum: float, **options: Any
) -> None:
    """Add option `flag`: a number of `kind` (int or float), at least `minimum`."""
    parser.add_argument(flag, type=_positive(kind, flag, minimum), **options)


# Commands ---------------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    from .info import info_report

    text, selection_usable = info_report()
    print(text)
    return 0 if selection_usable else FAILED


def _build_native(args: argparse.Namespace) -> int:
    from . import native

    built = native.build()
    print(f"C++ autograd node: {native.status()}")
    return 0 if built else FAILED


# The environment variables that change what a default call does (docs/faq.md).
SETTINGS_ENV = (BACKEND_ENV, VALUE_CHECKS_ENV, LIMIT_ENV, NATIVE_ENV, LOG_ENV)


def _settings_from_environment() -> dict[str, str]:
    """The `SETTINGS_ENV` variables set for this run, by name: a run with any of them is not
    at roi_ops' defaults, and its table and JSON say so."""
    return {name: os.environ[name] for name in SETTINGS_ENV if name in os.environ}


def _bench(args: argparse.Namespace) -> int:
    from .bench.runner import (
        count_steps,
        format_host_table,
        format_table,
        host_rows,
        plan_benchmark,
        run_benchmark,
        run_host_overhead,
        to_json,
        usable_backends,
    )
    from .bench.workloads import resolve_workloads

    device = check_device(args.device)
    dtype_names = list(dict.fromkeys(args.dtype))
    dtypes = [DTYPES[d] for d in dtype_names]
    workload_names = check_workloads(args.workload)
    modes = tuple(m for m in MODES if m in args.mode) if args.mode else MODES
    if args.sync and args.queue is not None:
        raise UsageError("--sync and --queue: give one (--sync is --queue 1)")
    queue = 1 if args.sync else (args.queue or DEFAULT_QUEUE)
    if device.type != "cuda" and (args.sync or args.queue is not None):
        sys.stderr.write("note: --sync and --queue apply to CUDA only; ignored on the CPU\n")
    _check_output_path("--json", args.json)
    _check_output_path("--plot", args.plot)
    if args.plot:
        check_matplotlib("--plot")
    if args.threads:
        # numba's pool must be sized before the plugin imports numba; torch's OpenMP setting
        # alone can be reset when another library initialises OpenMP.
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    backends, notes = check_backends(args.backend, device, dtypes)
    for note in notes:
        sys.stderr.write(f"note: {note}\n")
    from .bench.pyramid import FPN_MULTI

    pyramid = workload_names is None or FPN_MULTI.name in workload_names
    if workload_names is not None:
        workload_names = [n for n in workload_names if n != FPN_MULTI.name]
    workloads = (
        resolve_workloads(workload_names, device, args.full_size)
        if (workload_names is None or workload_names)
        else []
    )
    plan = plan_benchmark(device, dtypes, workloads, backends)
    host_plan = []
    if not args.no_host_time:
        host_backends = usable_backends(device, torch.float32, backends)
        host_plan = host_rows(host_backends, backends is not None, args.checks_off)
    pyramid_workload = None
    if pyramid:
        pyramid_workload = (
            FPN_MULTI if device.type == "cuda" or args.full_size else (FPN_MULTI.scaled_for_cpu())
        )
    total = count_steps(plan, modes, args.checks_off) + len(host_plan) * len(modes)
    if pyramid:
        from .bench.pyramid import pyramid_methods

        total += len(pyramid_methods()) * len(modes) * len(dtypes)
    budget = args.budget if args.budget else (0.5 if device.type == "cpu" else 0.25)
    progress = _progress(total)
    queue_used = queue if device.type == "cuda" else 1
    if any(mode != "infer" for mode in modes):
        # Default calls that need a gradient run through roi_ops' C++ autograd node once it is
        # built (roi_ops.native); time that steady state, not the calls before it.
        from . import native

        sys.stderr.write("waiting for roi_ops' C++ autograd node (roi_ops.native) ...\n")
        native.wait(timeout=600)
        sys.stderr.write(f"C++ autograd node: {native.status()}\n")
    results, bandwidth = run_benchmark(
        device,
        plan,
        budget,
        channels_last=args.channels_last,
        progress=progress,
        min_reps=args.min_reps,
        modes=modes,
        queue=queue_used,
        checks_off=args.checks_off,
    )
    # A second a row at the default budget: the small problem's medians from a quarter second
    # moved between runs on a shared host by more than the 1.1x the host table is judged by.
    host = run_host_overhead(device, host_plan, min(4 * budget, 1.0), modes, progress)
    pyramid_results = []
    if pyramid_workload is not None:
        from .bench.pyramid import run_pyramid_benchmark

        pyramid_results = run_pyramid_benchmark(
            device, dtypes, pyramid_workload, budget, modes, queue_used, progress
        )
    sys.stderr.write("\n")
    timing = (
        (
            f"{queue} calls queued per sample (as a training loop issues them)"
            if queue > 1
            else "one synchronised call per sample"
        )
        if device.type == "cuda"
        else "one call per sample"
    )
    print(
        f"device {device}  threads {torch.get_num_threads()}  copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s  layout "
        f"{'channels_last' if args.channels_last else 'contiguous'}  timing: {timing}"
    )
    changed = _settings_from_environment()
    print(
        "settings: roi_ops defaults (value checks on)"
        + "".join(f", except {name}={value}" for name, value in changed.items())
        + ("; rows marked [checks off] use roi_ops.value_checks(False)" if args.checks_off else "")
    )
    for w in workloads:
        print(f"  {w.name}: {w.describe()}")
    if results:
        print(format_table(results))
    if pyramid_results:
        from .bench.pyramid import format_pyramid_table

        print()
        print(format_pyramid_table(pyramid_results))
    if host:
        print()
        print(format_host_table(host, device))
    extra = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "queue": queue_used,
        "settings": "default" + (" and checks off" if args.checks_off else ""),
        "environment": changed,
        "command": " ".join(
            ["python -m roi_ops", *(sys.argv[1:] if args.argv is None else args.argv)]
        ),
    }
    if device.type == "cuda":
        extra["gpu"] = torch.cuda.get_device_name(device)
    document = to_json(results, bandwidth, extra, host if host_plan else None)
    if pyramid_results:
        document["pyramid"] = [
            {**{k: v for k, v in vars(r).items() if k != "times"},
             "times_ms": {m: t.median for m, t in r.times.items()},
             "spread_ms": {m: [t.q1, t.q3] for m, t in r.times.items()}}
            for r in pyramid_results
        ]  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
        print(f"wrote {args.json}")
    if not any(r.times_ms for r in results) and not any(r.times for r in pyramid_results):
        sys.stderr.write("error: no measurement succeeded (the table shows each error)\n")
        return FAILED
    if args.plot:
        from .bench.plot import chartable_dtypes, plot_results

        chartable = chartable_dtypes(document)
        for dtype, path in chart_paths(args.plot, dtype_names).items():
            if dtype in chartable:
                print(f"wrote {plot_results(document, path, dtype)}")
            else:
                sys.stderr.write(f"note: no chart for {dtype}: no baseline measured for it\n")
    return 0


def _plot(args: argparse.Namespace) -> int:
    check_matplotlib("plot")
    _check_output_path("plot", args.png)
    path = Path(args.json)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise UsageError(f"plot: cannot read {args.json}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise UsageError(
            f"plot: {args.json} is not JSON ({error}); give a file written by "
            "`python -m roi_ops bench --json FILE`"
        ) from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise UsageError(
            f"plot: {args.json} has no 'results' list; give a file written by "
            "`python -m roi_ops bench --json FILE`"
        )
    from .bench.plot import chartable_dtypes, dtypes_in, plot_results

    available = dtypes_in(document)
    if not available:
        raise UsageError(f"plot: {args.json} holds no successful measurement to chart")
    if args.dtype is not None and args.dtype not in available:
        raise UsageError(
            f"plot --dtype: {args.json} has no measurement of {args.dtype!r} (it has: "
            f"{', '.join(available)})"
        )
    if args.dtype:
        wanted = [args.dtype]
    else:  # every dtype that has a baseline (torchvision has no bfloat16 kernel)
        wanted = chartable_dtypes(document) or available
        for dtype in available:
            if dtype not in wanted:
                sys.stderr.write(f"note: no chart for {dtype}: no baseline measured for it\n")
    for dtype, png in chart_paths(args.png, wanted).items():
        print(f"wrote {plot_results(document, png, dtype)}")
    return 0


# Parser -----------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after an option's help when X says something (not None/False) and
    the help does not already give the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        shown = " ".join(default) if isinstance(default, list) else default
        return f"{text} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m roi_ops``."""
    from . import __version__

    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m roi_ops",
        description="roi_ops command line: the backend report, the benchmark and its charts.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"roi_ops {__version__} (torch {torch.__version__})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser(
        "info",
        help="versions, every backend and why it can or cannot run, and what auto picks",
        description="Versions, every backend with its capabilities and reasons, and what a call "
        "would run on each device (flagging a ROI_OPS_BACKEND that names no usable backend: "
        "exit status 1 then).",
        formatter_class=formatter,
    )
    sub.add_parser(
        "build-native",
        help="build roi_ops' C++ autograd node now (else the first call that needs a gradient "
        "builds it in the background)",
        description="Compiles roi_ops' C++ autograd node (roi_ops.native) into torch's "
        "extension cache, or loads it from there, and says whether it is in use (exit status 1 "
        "when the build failed; roi_ops then keeps its Python autograd path).",
        formatter_class=formatter,
    )
    bench = sub.add_parser(
        "bench",
        help="time every usable backend side by side with torchvision",
        description="Times roi_pool on detection-sized workloads for every usable backend and "
        "torchvision, at roi_ops' default settings (value checks on), as users get them, in "
        "three modes: inference (no gradient), forward (argmax kept for a gradient) and "
        "forward+backward. Prints median milliseconds with their spread, ratios to "
        "torchvision, and the host microseconds per call of a small problem. On CUDA each "
        "sample times --queue calls issued back to back, as a training loop issues them: the "
        "figure is the steady cost per call, bound by the device or by the host's launch "
        "work, whichever is slower. --sync instead times single synchronised calls (the "
        "latency one isolated call sees).",
        formatter_class=formatter,
    )
    bench.add_argument("--device", default="cpu", help="where to run: cpu, cuda or cuda:INDEX")
    bench.add_argument(
        "--dtype",
        nargs="+",
        default=["float32"],
        choices=list(DTYPES),
        metavar="DTYPE",
        help=f"input dtypes, one table section each ({', '.join(DTYPES)})",
    )
    from .bench.workloads import WORKLOADS

    bench.add_argument(
        "--workload",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"workloads to time (default: all of {', '.join(WORKLOADS)}); on the CPU they are "
        "scaled down unless --full-size",
    )
    bench.add_argument(
        "--backend",
        nargs="+",
        default=None,
        metavar="NAME",
        help="backends to time, case ignored: registered names, 'auto' (what a default call "
        "runs) and 'torchvision' (default: every backend usable here, and torchvision when it "
        "is installed)",
    )
    bench.add_argument(
        "--mode",
        nargs="+",
        default=None,
        choices=list(MODES),
        metavar="MODE",
        help="what to time: infer (no gradient), fwd (forward that keeps the argmax), fwd+bwd "
        "(default: all three)",
    )
    bench.add_argument(
        "--channels-last",
        action="store_true",
        help="feed channels_last inputs (roi_ops reads them in place; torchvision copies)",
    )
    bench.add_argument(
        "--checks-off",
        action="store_true",
        help="also time each roi_ops backend with the ROI value checks off "
        "(roi_ops.value_checks(False)), in extra rows labelled [checks off]",
    )
    _number_option(
        bench,
        "--queue",
        int,
        1,
        default=None,
        metavar="CALLS",
        help=f"CUDA: calls issued back to back per timed sample (default: {DEFAULT_QUEUE}, as "
        "in training; the host runs ahead of the GPU)",
    )
    bench.add_argument(
        "--sync",
        action="store_true",
        help="CUDA: time one synchronised call per sample (same as --queue 1): the latency of "
        "an isolated call, host launch work included",
    )
    _number_option(
        bench,
        "--threads",
        int,
        0,
        default=0,
        help="torch and numba threads (default: 0, meaning torch's own choice)",
    )
    _number_option(
        bench,
        "--budget",
        float,
        0.0,
        default=0.0,
        metavar="SECONDS",
        help="seconds of repeats per measurement (default: 0, meaning 0.5 on the CPU and 0.25 "
        "on CUDA)",
    )
    _number_option(
        bench,
        "--min-reps",
        int,
        1,
        default=3,
        help="timed samples per measurement at least",
    )
    bench.add_argument(
        "--full-size",
        action="store_true",
        help="on the CPU, time the GPU-sized workloads instead of scaled-down ones",
    )
    bench.add_argument(
        "--no-host-time",
        action="store_true",
        help="skip the host time per call of the small problem",
    )
    bench.add_argument(
        "--json", default=None, metavar="PATH", help="write every median and spread here"
    )
    bench.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="write a PNG chart of the speed-up over torchvision (needs matplotlib); with "
        "several dtypes one chart each, named STEM-DTYPE.png",
    )
    plot = sub.add_parser(
        "plot",
        help="chart a JSON file written by bench --json",
        description="Horizontal bars of each backend's speed-up over torchvision, per workload "
        "and mode, from a JSON file written by `python -m roi_ops bench --json` (needs "
        "matplotlib).",
        formatter_class=formatter,
    )
    plot.add_argument("json", help="the JSON file written by bench --json")
    plot.add_argument("png", help="the chart to write (STEM-DTYPE.png per dtype when several)")
    plot.add_argument(
        "--dtype", default=None, help="chart only this dtype (default: one chart per dtype)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a parse error argparse has printed
        return stop.code if isinstance(stop.code, int) else USAGE_ERROR
    args.argv = argv
    command = {"info": _info, "build-native": _build_native, "bench": _bench, "plot": _plot}[
        args.command
    ]
    try:
        return command(args)
    except UsageError as error:
        sys.stderr.write(f"python -m roi_ops {args.command}: error: {error}\n")
        return USAGE_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
