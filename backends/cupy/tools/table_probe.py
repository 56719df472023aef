"""GPU probe of the tables of maxima: the cvec inference with the tables as the rule decides,
forced on and switched off, on every bench workload and both layouts, in one run.

Not a benchmark of record (that is ``python -m roi_ops bench``): this times the backend's
launcher (preallocated outputs, no roi_ops dispatch) with three tunings (``rule``: the
planning's and the device's decision, the default; ``forced``: ``max_tables=True``, built and
read wherever they can be; ``off``: ``max_tables=False``), the tables' count and build alone
(with the device's decision, shown also where the host's rule queues no tables), the whole
``roi_ops.roi_pool`` call as a user makes it with the rule (the default launcher) and with
``off`` (swapped in for the call), and torchvision on the same input.
Rounds alternate the calls; each figure is the median over rounds of a sample of `--inner`
back-to-back calls between two CUDA events. The three tunings' outputs are checked bit for bit
against each other on the workload's input and on a tie-heavy one. NCHW inputs go through the
launcher as the backend gets them: staged (and then with tables) where the staging rule says
so. Run on the GPU machine:

    python backends/cupy/tools/table_probe.py [--workload big-batch ...] [--dtype float32 ...]
        [--layout channels_last nchw] [--rounds 7] [--inner 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import roi_ops
import torch
from roi_ops.backend import RoIPoolProblem
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois

from roi_ops_cupy import launch, planning
from roi_ops_cupy.tuning import DEFAULT_TUNING

TUNINGS = {
    "rule": DEFAULT_TUNING,
    "forced": replace(DEFAULT_TUNING, max_tables=True),
    "off": replace(DEFAULT_TUNING, max_tables=False),
}


def _tables_of(launcher: launch.Launcher):
    """The `_Tables` of the launcher's one planned forward (None: it queues none)."""
    (_, _, _, tables), *_ = launcher._forward.values()
    return tables


def _through_roi_pool(launcher: launch.Launcher, x, rois, w):
    """`roi_ops.roi_pool` inference on the CuPy backend with `launcher` as its default one."""

    def call():
        default = launch.DEFAULT_LAUNCHER
        launch.DEFAULT_LAUNCHER = launcher
        try:
            with torch.no_grad():
                roi_ops.roi_pool(x, rois, w.output_size, w.spatial_scale, backend="cupy")
        finally:
            launch.DEFAULT_LAUNCHER = default

    return call


def probe(w, dtype: torch.dtype, layout: str, args) -> dict:
    """One workload, dtype and layout: prints its row and returns it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe import bits, tie_heavy
    from stage_probe import time_rounds, torchvision_call

    device = torch.device("cuda")
    x = make_input(w, dtype, device, channels_last=layout == "channels_last")
    rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, device)
    size = w.output_size
    problem = RoIPoolProblem(x, rois, size, size, w.spatial_scale, False)
    out = torch.empty(problem.output_shape, dtype=dtype, device=device)
    launchers = {name: launch.Launcher(tuning) for name, tuning in TUNINGS.items()}
    calls = {name: (lambda la=la: la.forward(problem, out, None)) for name, la in launchers.items()}
    for name in ("rule", "off"):
        calls[f"roi_pool {name}"] = _through_roi_pool(launchers[name], x, rois, w)
    for fn in calls.values():  # plan, compile
        fn()
    decision = None
    queued = _tables_of(launchers["rule"]) is not None  # the host's half of the rule
    if _tables_of(launchers["forced"]) is not None:  # the cvec kernel can read tables here
        # The device's half of the rule on the map as the kernel reads it (its own buffer), and
        # the count and build alone.
        device_index = x.get_device()
        stand_in = x.contiguous(memory_format=torch.channels_last)
        staged = RoIPoolProblem(stand_in, rois, size, size, w.spatial_scale, False)
        sizes = launch.cuda_sizes(device_index)
        counted = launch._Tables(device_index, staged, sizes, TUNINGS["rule"])
        head = counted.run(device_index, stand_in, rois)[0]
        head = head[: planning.TABLE_HEAD_BYTES // head.element_size()]
        decision = int(head.view(torch.int32)[0])
        calls["count+build"] = lambda: counted.run(device_index, stand_in, rois)[0]
    tv_call = torchvision_call(x, rois, size, w.spatial_scale)
    if tv_call is not None:
        calls["torchvision"] = tv_call
    same = True
    for values in (x, tie_heavy(x)):
        checked = RoIPoolProblem(values, rois, size, size, w.spatial_scale, False)
        results = []
        for launcher in launchers.values():
            result = torch.full_like(out, float("nan"))
            launcher.forward(checked, result, None)
            results.append(bits(result))
        same = same and all(torch.equal(results[0], r) for r in results[1:])
    torch.cuda.synchronize()
    ms, spread = time_rounds(calls, args.rounds, args.inner)
    row = {
        "workload": w.name,
        "dtype": str(dtype)[6:],
        "layout": layout,
        "ms": ms,
        "spread": spread,
        "queued": queued,
        "decision": decision,
        "same_bits": same,
    }
    tv = ms.get("torchvision")
    tv_cells = (
        f" | tv {tv:.3f} tv/rule {tv / ms['rule']:.2f}x tv/off {tv / ms['off']:.2f}x" if tv else ""
    )
    build = f" count+build {ms['count+build']:.3f}" if "count+build" in ms else ""
    call = ms["roi_pool off"] / ms["roi_pool rule"]
    print(
        f"{w.name:10} {str(dtype)[6:]:8} {layout:13} off {ms['off']:.3f} rule {ms['rule']:.3f} "
        f"({ms['off'] / ms['rule']:.2f}x) forced {ms['forced']:.3f} "
        f"({ms['off'] / ms['forced']:.2f}x){build} queued {'yes' if queued else 'no'} "
        f"decision {decision} | roi_pool rule {ms['roi_pool rule']:.3f} off "
        f"{ms['roi_pool off']:.3f} ({call:.2f}x){tv_cells} "
        f"| spread {max(spread.values()):.0%} | bits {'same' if same else 'DIFFER'}",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--dtype", nargs="*", default=["float32", "float16"])
    parser.add_argument("--layout", nargs="*", default=["channels_last", "nchw"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("table_probe: needs a CUDA device", file=sys.stderr)
        return 2
    print(
        f"table_probe on {torch.cuda.get_device_name()}: inference ms per call, medians of "
        f"{args.rounds} rounds of {args.inner} calls; (x): off over the column's time"
    )
    rows = [
        probe(WORKLOADS[name], getattr(torch, dtype), layout, args)
        for name in args.workload
        for dtype in args.dtype
        for layout in args.layout
    ]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    differ = [f"{r['workload']} {r['dtype']} {r['layout']}" for r in rows if not r["same_bits"]]
    print(f"bit checks: {len(differ)} differ {differ}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
