"""Kernel times of the channels_last forward kernels against the NCHW ones, on the GPU machine.

For each workload and dtype: CuPy's unit kernel on the NCHW input, its cvec kernel and its chan
kernel (``ROI_OPS_CUPY_KERNEL=chan``, the fallback for unaligned channels) on a channels_last
copy, Triton's unit kernel (NCHW) and channels_last kernel, the cost of the layout copy itself,
and torchvision's roi_pool on the NCHW input. Then checks, on normal and tie-heavy inputs, that
every channels_last kernel gives the unit kernel's bits (outputs, argmax, inference).

    python scripts/channels_last_probe.py [--workload fpn-p4 ...] [--dtype float32 ...]

Times are medians of samples of ten queued launches (``gpu_probe.pipelined_ms``), with argmax
("+arg") and without; ratios are torchvision's time over each.
"""

from __future__ import annotations

import argparse
import sys

import gpu_probe
import torch
from gpu_probe import bits, cupy_runner, pipelined_ms, tie_heavy_input, triton_runner

from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois

gpu_probe.CUPY_VARIANTS.setdefault("chan", {"ROI_OPS_CUPY_KERNEL": "chan"})


def probe(name: str, dtype: torch.dtype, reps: int) -> int:
    """Print one row of times; return the number of bit mismatches."""
    from torchvision.ops import roi_pool as torchvision_roi_pool

    w = WORKLOADS[name]
    device = torch.device("cuda")
    x = make_input(w, dtype, device)
    rois = make_rois(w, dtype, device)
    last = x.contiguous(memory_format=torch.channels_last)
    copy = torch.empty_like(last)
    shape = (rois.shape[0], w.channels, w.output_size, w.output_size)
    out = torch.empty(shape, dtype=dtype, device=device)
    arg = torch.empty(shape, dtype=torch.int32, device=device)
    runs = {
        "cupy-unit": (cupy_runner, x, "unit"),
        "cupy-cvec": (cupy_runner, last, "unit"),
        "cupy-chan": (cupy_runner, last, "chan"),
        "triton-unit": (triton_runner, x, "unit"),
        "triton-cl": (triton_runner, last, "unit"),
    }
    ms = {}
    for label, (runner, inp, variant) in runs.items():
        ms[label + "+arg"] = pipelined_ms(runner(inp, rois, w, out, arg, variant), reps, 10)
        ms[label] = pipelined_ms(runner(inp, rois, w, out, None, variant), reps, 10)
    ms["copy-to-cl"] = pipelined_ms(lambda: copy.copy_(x), reps, 10)
    ms["tv+arg"] = pipelined_ms(
        lambda: torchvision_roi_pool(x, rois, w.output_size, w.spatial_scale), reps, 10
    )
    tv = ms["tv+arg"]
    row = "  ".join(f"{k}={v:.3f}({tv / v:.2f}x)" for k, v in ms.items())
    print(f"{name:10s} {str(dtype).removeprefix('torch.'):8s} {row}", flush=True)
    mismatches = 0
    for inputs in ("normal", "ties"):
        xi = x if inputs == "normal" else tie_heavy_input(w, dtype, device)
        ref_out, ref_arg = torch.full_like(out, 1.5), torch.full_like(arg, -7)
        cupy_runner(xi, rois, w, ref_out, ref_arg, "unit")()
        xl = xi.contiguous(memory_format=torch.channels_last)
        for label, (runner, _, variant) in runs.items():
            if label.endswith("unit"):
                continue
            o, a = torch.full_like(out, 2.5), torch.full_like(arg, -9)
            runner(xl, rois, w, o, a, variant)()
            o2 = torch.full_like(out, 3.5)
            runner(xl, rois, w, o2, None, variant)()
            same = (
                torch.equal(bits(o), bits(ref_out))
                and torch.equal(a, ref_arg)
                and torch.equal(bits(o2), bits(ref_out))
            )
            if not same:
                print(f"MISMATCH {name} {dtype} {inputs} {label}", flush=True)
                mismatches += 1
    return mismatches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--dtype", nargs="*", default=["float32", "float16"])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    bad = sum(
        probe(name, getattr(torch, dtype), args.reps)
        for name in args.workload
        for dtype in args.dtype
    )
    print(f"bit mismatches: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
