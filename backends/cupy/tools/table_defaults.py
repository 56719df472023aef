"""GPU comparison of the tables of maxima as a user gets them: `roi_ops.roi_pool` inference at
default settings (the tables as the rule decides) against the same call with
``max_tables=False``, and torchvision, in one run.

Not a benchmark of record (that is ``python -m roi_ops bench``): the backend's default launcher
is swapped for one without tables between calls (both plan and cache as the default one does);
rounds alternate the three calls; each figure is the median over rounds of a sample of
`--inner` calls queued between two CUDA events. Run on the GPU machine:

    python backends/cupy/tools/table_defaults.py [--workload big-batch fpn-p2 ...]
        [--dtype float32 float16] [--layout channels_last nchw] [--rounds 9] [--inner 10]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import roi_ops
import torch
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois

from roi_ops_cupy import launch


def compare(w, dtype: torch.dtype, layout: str, args) -> None:
    """Prints one workload's row: defaults, no tables, torchvision."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stage_probe import time_rounds, torchvision_call

    default = launch.DEFAULT_LAUNCHER
    without = launch.Launcher(replace(default.tuning, max_tables=False))
    device = torch.device("cuda")
    x = make_input(w, dtype, device, channels_last=layout == "channels_last")
    rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, device)

    def through(launcher):
        def call():
            launch.DEFAULT_LAUNCHER = launcher
            with torch.no_grad():
                roi_ops.roi_pool(x, rois, w.output_size, w.spatial_scale, backend="cupy")

        return call

    calls = {"defaults": through(default), "no tables": through(without)}
    tv_call = torchvision_call(x, rois, w.output_size, w.spatial_scale)
    if tv_call is not None:
        calls["torchvision"] = tv_call
    try:
        for fn in calls.values():  # plan, compile
            fn()
        torch.cuda.synchronize()
        ms, spread = time_rounds(calls, args.rounds, args.inner)
    finally:
        launch.DEFAULT_LAUNCHER = default
    tv = ms.get("torchvision")
    tv_cells = (
        f" | tv {tv:.3f} tv/defaults {tv / ms['defaults']:.2f}x "
        f"tv/no-tables {tv / ms['no tables']:.2f}x"
        if tv
        else ""
    )
    print(
        f"{w.name:10} {str(dtype)[6:]:8} {layout:13} defaults {ms['defaults']:.3f} no tables "
        f"{ms['no tables']:.3f} ({ms['no tables'] / ms['defaults']:.2f}x){tv_cells} "
        f"| spread {max(spread.values()):.0%}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="*", default=["big-batch", "fpn-p2", "frcnn-c4"])
    parser.add_argument("--dtype", nargs="*", default=["float32", "float16"])
    parser.add_argument("--layout", nargs="*", default=["channels_last", "nchw"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--inner", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("table_defaults: needs a CUDA device", file=sys.stderr)
        return 2
    print(
        f"table_defaults on {torch.cuda.get_device_name()}: roi_ops.roi_pool inference ms per "
        f"call, medians of {args.rounds} rounds of {args.inner} queued calls; (x): no tables "
        "over defaults"
    )
    for name in args.workload:
        for dtype in args.dtype:
            for layout in args.layout:
                compare(WORKLOADS[name], getattr(torch, dtype), layout, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
