"""GPU probe of the staged forward: NCHW inputs pooled from a channels_last copy, on every bench
workload, against the same forward on the input itself, in one run.

Not a benchmark of record (that is ``python -m roi_ops bench``): this times the backend's
launcher (preallocated outputs, no roi_ops dispatch) with staging forced on and off, the copy
alone (the copy kernel against torch's ``contiguous(memory_format=torch.channels_last)``), and
torchvision. Rounds alternate the variants; each figure is the median over rounds of a
sample of `--inner` back-to-back calls between two CUDA events. The staged and unstaged outputs
and argmax are checked bit for bit. Run on the GPU machine:

    python backends/cupy/tools/stage_probe.py [--workload fpn-p2 ...] [--dtype float16 ...]
        [--rounds 9] [--inner 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace

import torch
from roi_ops.backend import RoIPoolProblem
from roi_ops.bench.runner import time_calls
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois

from roi_ops_cupy import launch
from roi_ops_cupy.tuning import DEFAULT_TUNING

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def sample_ms(fn, inner: int) -> float:
    """Milliseconds per call over one sample of `inner` back-to-back calls (the bench's timer)."""
    cuda = torch.device("cuda")
    return time_calls(fn, cuda, 0.0, warmup=0, min_reps=1, max_reps=1, queue=inner).median


def torchvision_call(x: torch.Tensor, rois: torch.Tensor, size: int, scale: float):
    """torchvision's roi_pool on `x` as a call, or None (bfloat16, or no torchvision)."""
    if x.dtype == torch.bfloat16:
        return None
    try:
        from torchvision.ops import roi_pool as tv_roi_pool
    except ImportError:
        return None
    rois_tv = rois.to(x.dtype)
    return lambda: tv_roi_pool(x, rois_tv, size, scale)


def time_rounds(calls: dict, rounds: int, inner: int) -> tuple[dict, dict]:
    """(median ms, spread: (max - min) / median) of each call over `rounds` rounds that
    alternate the calls, a sample of `inner` back-to-back calls each."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            samples[name].append(sample_ms(fn, inner))
    ms = {name: statistics.median(v) for name, v in samples.items()}
    spread = {name: (max(v) - min(v)) / statistics.median(v) for name, v in samples.items()}
    return ms, spread


def probe(w, dtype, args) -> dict:
    device = torch.device("cuda")
    x = make_input(w, dtype, device)
    rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, device)
    size = w.output_size
    shape = (rois.shape[0], w.channels, size, size)
    out = torch.empty(shape, dtype=dtype, device=device)
    arg = torch.empty(shape, dtype=torch.int32, device=device)
    launchers = {
        "rule": launch.Launcher(DEFAULT_TUNING),
        "staged": launch.Launcher(replace(DEFAULT_TUNING, stage_channels_last=True)),
        "nchw": launch.Launcher(replace(DEFAULT_TUNING, stage_channels_last=False)),
    }
    calls = {}
    for name, launcher in launchers.items():
        for mode, needs in (("fwd", True), ("infer", False)):
            problem = RoIPoolProblem(x, rois, size, size, w.spatial_scale, needs)
            buffer = arg if needs else None
            calls[f"{name} {mode}"] = lambda la=launcher, p=problem, b=buffer: la.forward(p, out, b)
    tv_call = torchvision_call(x, rois, size, w.spatial_scale)
    if tv_call is not None:
        calls["torchvision"] = tv_call
    # Bits: staged against unstaged, both modes.
    results = {}
    for name in ("staged", "nchw"):
        o, a, o2 = torch.full_like(out, 1.5), torch.full_like(arg, -7), torch.full_like(out, 2.5)
        launchers[name].forward(RoIPoolProblem(x, rois, size, size, w.spatial_scale, True), o, a)
        launchers[name].forward(
            RoIPoolProblem(x, rois, size, size, w.spatial_scale, False), o2, None
        )
        results[name] = (o.view(_BITS[o.element_size()]), a, o2.view(_BITS[o.element_size()]))
    same = all(torch.equal(s, n) for s, n in zip(results["staged"], results["nchw"], strict=True))
    copy = _copy_launch(launchers["staged"], w)
    calls["copy kernel"] = lambda: launch.Launcher._stage(x, copy, x.get_device())
    calls["copy torch"] = lambda: x.contiguous(memory_format=torch.channels_last)
    for fn in calls.values():  # warm-up: compile, plan, allocate
        fn()
    torch.cuda.synchronize()
    ms, spread = time_rounds(calls, args.rounds, args.inner)
    input_bytes = x.numel() * x.element_size()
    row = {
        "workload": w.name,
        "dtype": str(dtype)[6:],
        "ms": ms,
        "spread": spread,
        "same_bits": same,
        "input_bytes": input_bytes,
        "copy_kernel_GBps": 2 * input_bytes / ms["copy kernel"] / 1e6,
        "copy_torch_GBps": 2 * input_bytes / ms["copy torch"] / 1e6,
    }
    tv = ms.get("torchvision")
    cells = []
    for mode in ("infer", "fwd"):
        n, s, r = ms[f"nchw {mode}"], ms[f"staged {mode}"], ms[f"rule {mode}"]
        ratio = f" tv/{tv / r:.2f}x" if tv else ""
        cells.append(f"{mode} nchw {n:.3f} staged {s:.3f} ({n / s:.2f}x) rule {r:.3f}{ratio}")
    print(
        f"{w.name:10} {str(dtype)[6:]:8} " + " | ".join(cells)
        + f" | copy {ms['copy kernel']:.3f} ({row['copy_kernel_GBps']:.0f} GB/s) torch "
        f"{ms['copy torch']:.3f} | bits {'same' if same else 'DIFFER'}",
        flush=True,
    )  # fmt: skip
    return row


def _copy_launch(launcher, w):
    """The packed copy launch the staged launcher planned for `x`."""
    for _, staged, copy, _ in launcher._forward.values():
        if staged and copy is not None:
            return copy
    raise RuntimeError(f"{w.name}: the staged launcher planned no copy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--dtype", nargs="*", default=["float32", "float16", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("stage_probe: needs a CUDA device", file=sys.stderr)
        return 2
    print(f"stage_probe on {torch.cuda.get_device_name()}: ms per call, medians of "
          f"{args.rounds} rounds of {args.inner} calls")  # fmt: skip
    rows = []
    for name in args.workload:
        for dtype in args.dtype:
            rows.append(probe(WORKLOADS[name], getattr(torch, dtype), args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0 if all(r["same_bits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
