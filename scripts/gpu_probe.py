"""Kernel-level GPU probe for tuning: variant kernel times, host overhead, a profiler breakdown.

Not a benchmark of record (that is ``python -m roi_ops bench``): this times the raw kernels of
the CuPy and Triton backends (preallocated outputs, no roi_ops dispatch) against torchvision,
checks that every CuPy forward variant gives the same bits as the plane kernel, and shows what a
whole ``roi_pool`` call adds on top of its kernel. Run on the GPU machine:

    python scripts/gpu_probe.py --out $OUT [--workload fpn-p4 ...] [--dtype float32 ...]
    python scripts/gpu_probe.py --ncu fpn-p4      # a few launches of each kernel, for ncu -k

Times are medians over samples of `--inner` back-to-back launches between two CUDA events.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from roi_ops import roi_pool
from roi_ops.backend import RoIPoolProblem
from roi_ops.bench.runner import median_time_ms
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois
from roi_ops.config import value_checks

CUPY_VARIANTS = {
    "plane": {"ROI_OPS_CUPY_KERNEL": "plane"},
    "unit": {},
    "unit512": {"ROI_OPS_CUPY_BLOCK_ELEMENTS": "512"},
    "unit16k": {"ROI_OPS_CUPY_BLOCK_ELEMENTS": "16384"},
    "unit-nocs": {"ROI_OPS_CUPY_DEFINES": "-DROI_OPS_NO_STREAMING_STORES"},
    "unit-u8": {"ROI_OPS_CUPY_DEFINES": "-DROI_OPS_UNIT_CHANNELS=8 -DROI_OPS_UNIT_MIN_BLOCKS=2"},
    "unit-u2": {"ROI_OPS_CUPY_DEFINES": "-DROI_OPS_UNIT_CHANNELS=2 -DROI_OPS_UNIT_MIN_BLOCKS=6"},
    "unit-b5": {"ROI_OPS_CUPY_DEFINES": "-DROI_OPS_UNIT_MIN_BLOCKS=5"},
    "unit-b6": {"ROI_OPS_CUPY_DEFINES": "-DROI_OPS_UNIT_MIN_BLOCKS=6"},
}
TRITON_VARIANTS = {
    "unit": "",
    "flat": "unit=0",
    "unit-l64w2": "block_b=64,num_warps=2",
    "unit-l128w4": "block_b=128,num_warps=4",
    "unit-l128w4-e2k": "block_b=128,num_warps=4,block_elements=2048",
    "unit-l512w16": "block_b=512,num_warps=16",
    "unit-e1k": "block_elements=1024",
    "unit-e2k": "block_elements=2048",
    "unit-e8k": "block_elements=8192",
}


@contextlib.contextmanager
def environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pipelined_ms(fn, reps: int, inner: int) -> float:
    """Median over `reps` samples of `inner` back-to-back calls (the bench's own timer)."""
    return median_time_ms(fn, torch.device("cuda"), 0.0, min_reps=reps, max_reps=reps, queue=inner)


def synced_ms(fn, reps: int) -> float:
    """Median of `reps` single synchronised calls (host overhead included)."""
    return pipelined_ms(fn, reps, 1)


def cupy_runner(x, rois, w, out, arg, variant):
    from roi_ops_cupy import kernels, launch

    problem = RoIPoolProblem(x, rois, w.output_size, w.output_size, w.spatial_scale, True)
    with environ(CUPY_VARIANTS[variant]):
        sizes = launch._device_sizes(x.device.index or 0)[:2]
        plan = kernels.plan_forward(problem, out, arg, *sizes)
    names = kernels.forward_names(x.dtype, rois.dtype)
    device = x.device.index or 0
    defines = CUPY_VARIANTS[variant].get(kernels.DEFINES_ENV, "")

    def run():
        with environ({kernels.DEFINES_ENV: defines}):
            launch._run(device, plan, names)

    return run


def triton_runner(x, rois, w, out, arg, variant):
    from roi_ops_triton import kernels

    overrides = TRITON_VARIANTS[variant]

    def run():
        with environ({"ROI_OPS_TRITON_FWD": overrides}):
            kernels.roi_pool_forward(
                x, rois, w.output_size, w.output_size, w.spatial_scale, out, arg
            )

    return run


def tie_heavy_input(w, dtype, device):
    """Small integers (many ties), some -0.0, NaN and -inf: exercises the ordering rules."""
    g = torch.Generator().manual_seed(7)
    shape = (w.num_images, w.channels, w.height, w.width)
    x = torch.randint(-3, 3, shape, generator=g).to(torch.float32)
    x[x == 0] = -0.0 * (torch.rand(int((x == 0).sum()), generator=g) < 0.5).float()
    special = torch.rand(shape, generator=g)
    x[special < 0.001] = float("nan")
    x[special > 0.999] = float("-inf")
    return x.to(dtype).to(device)


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def probe_workload(w, dtype, args, rows, checks):
    device = torch.device("cuda")
    x = make_input(w, dtype, device)
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    rois = make_rois(w, rois_dtype, device)
    shape = (rois.shape[0], w.channels, w.output_size, w.output_size)
    name = str(dtype).removeprefix("torch.")
    row = {"workload": w.name, "dtype": name, "ms": {}}
    out = torch.empty(shape, dtype=dtype, device=device)
    arg = torch.empty(shape, dtype=torch.int32, device=device)

    def time_both(label, make):
        row["ms"][label + "+arg"] = pipelined_ms(make(out, arg), args.reps, args.inner)
        row["ms"][label] = pipelined_ms(make(out, None), args.reps, args.inner)

    for variant in args.cupy:
        time_both(f"cupy:{variant}", lambda o, a, v=variant: cupy_runner(x, rois, w, o, a, v))
    for variant in args.triton_variants if args.triton else ():
        time_both(f"triton:{variant}", lambda o, a, v=variant: triton_runner(x, rois, w, o, a, v))
    try:
        from torchvision.ops import roi_pool as tv

        if dtype != torch.bfloat16:
            rois_tv = rois.to(dtype)
            row["ms"]["tv+arg"] = pipelined_ms(
                lambda: tv(x, rois_tv, w.output_size, w.spatial_scale), args.reps, args.inner
            )
    except ImportError:
        pass
    # Whole roi_pool calls: pipelined (host overhead hidden) and synced per call (exposed).
    leaf = x.detach().requires_grad_(True)
    with value_checks(False):
        for backend in ("cupy", "triton"):

            def call(inp=leaf, b=backend):
                return roi_pool(inp, rois, w.output_size, w.spatial_scale, backend=b)

            row["ms"][f"call:{backend}:fwd:pipelined"] = pipelined_ms(call, args.reps, args.inner)
            row["ms"][f"call:{backend}:fwd:synced"] = synced_ms(call, args.reps)
    # Bit equality of every CuPy variant with the plane kernel, on real and tie-heavy inputs.
    for inputs in ("normal", "ties"):
        xi = x if inputs == "normal" else tie_heavy_input(w, dtype, device)
        ref_out = torch.full_like(out, float("nan"))
        ref_arg = torch.full_like(arg, -7)
        cupy_runner(xi, rois, w, ref_out, ref_arg, "plane")()
        runners = [(v, cupy_runner) for v in args.cupy if v != "plane"]
        runners += [(v, triton_runner) for v in (args.triton_variants if args.triton else ())]
        for variant, runner in runners:
            o = torch.full_like(out, 1.5)
            a = torch.full_like(arg, -7)
            runner(xi, rois, w, o, a, variant)()
            o2 = torch.full_like(out, 1.5)
            runner(xi, rois, w, o2, None, variant)()
            same = bool(
                torch.equal(bits(o), bits(ref_out))
                and torch.equal(a, ref_arg)
                and torch.equal(bits(o2), bits(ref_out))
            )
            label = variant if runner is cupy_runner else f"triton:{variant}"
            checks.append((w.name, name, inputs, label, same))
    rows.append(row)
    ms = row["ms"]
    tv_ms = ms.get("tv+arg")
    parts = []
    for key in sorted(ms):
        ratio = f" ({tv_ms / ms[key]:.2f}x)" if tv_ms else ""
        parts.append(f"{key}={ms[key]:.3f}{ratio}")
    print(f"{w.name} {name}: " + "  ".join(parts), flush=True)


def profile_fwd_bwd(w, out_dir):
    device = torch.device("cuda")
    x = make_input(w, torch.float32, device).requires_grad_(True)
    rois = make_rois(w, torch.float32, device)
    grad = torch.randn(rois.shape[0], w.channels, w.output_size, w.output_size, device=device)
    from torch.profiler import ProfilerActivity, profile

    runs = {}
    with value_checks(False):
        for backend in ("cupy", "triton"):
            runs[backend] = lambda b=backend: roi_pool(
                x, rois, w.output_size, w.spatial_scale, backend=b
            ).backward(grad)
    try:
        from torchvision.ops import roi_pool as tv

        runs["torchvision"] = lambda: tv(x, rois, w.output_size, w.spatial_scale).backward(grad)
    except ImportError:
        pass
    for label, fn in runs.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                x.grad = None
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
        print(f"--- profile {w.name} {label} fwd+bwd x5")
        print(table)


def host_overhead(out_dir):
    """Host time per call on a tiny problem (GPU time negligible), and a cProfile of cupy calls."""
    import cProfile
    import pstats
    import time

    device = torch.device("cuda")
    x = torch.randn(2, 16, 16, 16, device=device)
    rois = torch.tensor([[0, 1.0, 1.0, 10.0, 12.0]] * 8, device=device)
    leaf = x.detach().requires_grad_(True)
    calls = {
        f"{b}:{mode}": (lambda b=b, inp=inp: roi_pool(inp, rois, 7, 1.0, backend=b))
        for b in ("cupy", "triton")
        for mode, inp in (("infer", x), ("grad", leaf))
    }
    try:
        from torchvision.ops import roi_pool as tv

        calls["torchvision:grad"] = lambda: tv(leaf, rois, 7, 1.0)
    except ImportError:
        pass
    from roi_ops_cupy import CupyBackend, kernels, launch

    problem = RoIPoolProblem(x, rois, 7, 7, 1.0, True)
    out = torch.empty(problem.output_shape, device=device)
    arg = torch.empty(problem.output_shape, device=device, dtype=torch.int32)
    plan = kernels.plan_forward(problem, out, arg, *launch._device_sizes(0)[:2])
    names = kernels.forward_names(x.dtype, rois.dtype)
    backend = CupyBackend()

    def custom_op_call():
        with environ({"ROI_OPS_EAGER_FAST_PATH": "0"}):
            return roi_pool(leaf, rois, 7, 1.0, backend="cupy")

    calls["cupy:grad:custom-op"] = custom_op_call
    calls["part:backend.forward"] = lambda: backend.forward(problem, out, arg)
    calls["part:plan_forward"] = lambda: kernels.plan_forward(
        problem, out, arg, *launch._device_sizes(0)[:2]
    )
    calls["part:_run"] = lambda: launch._run(0, plan, names)
    calls["part:2 x torch.empty"] = lambda: (
        torch.empty(problem.output_shape, device=device),
        torch.empty(problem.output_shape, device=device, dtype=torch.int32),
    )
    calls["part:current_stream"] = lambda: torch.cuda.current_stream(0)
    with value_checks(False):
        for label, fn in calls.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(300):
                fn()
            host = (time.perf_counter() - t0) / 300 * 1e6
            torch.cuda.synchronize()
            print(f"host overhead {label}: {host:.1f} us per call")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(300):
            calls["cupy:grad"]()
        profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler, stream=open(os.path.join(out_dir, "host-cupy.txt"), "w"))
    stats.sort_stats("tottime").print_stats(25)
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(12)


def ncu_target(name: str) -> None:
    """Two launches each of cupy plane and unit, triton unit and flat, torchvision."""
    w = WORKLOADS[name]
    device = torch.device("cuda")
    x = make_input(w, torch.float32, device)
    rois = make_rois(w, torch.float32, device)
    shape = (rois.shape[0], w.channels, w.output_size, w.output_size)
    out = torch.empty(shape, device=device)
    arg = torch.empty(shape, dtype=torch.int32, device=device)
    from torchvision.ops import roi_pool as tv

    fns = [
        cupy_runner(x, rois, w, out, arg, "plane"),
        cupy_runner(x, rois, w, out, arg, "unit"),
        triton_runner(x, rois, w, out, arg, "unit"),
        triton_runner(x, rois, w, out, arg, "flat"),
        lambda: tv(x, rois, w.output_size, w.spatial_scale),
    ]
    for fn in fns:
        for _ in range(2):
            fn()
    torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="probe-out")
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--dtype", nargs="*", default=["float32", "float16"])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--no-triton", dest="triton", action="store_false")
    parser.add_argument("--cupy", nargs="*", default=list(CUPY_VARIANTS), help="cupy variants")
    parser.add_argument(
        "--triton-variants", nargs="*", default=list(TRITON_VARIANTS), help="triton variants"
    )
    parser.add_argument("--no-host", dest="host", action="store_false")
    parser.add_argument("--profile", nargs="*", default=["frcnn-c4"])
    parser.add_argument("--ncu", default=None, help="only run the ncu target for a workload")
    args = parser.parse_args()
    if args.ncu:
        ncu_target(args.ncu)
        return 0
    os.makedirs(args.out, exist_ok=True)
    rows, checks = [], []
    for name in args.workload:
        for dtype in args.dtype:
            probe_workload(WORKLOADS[name], getattr(torch, dtype), args, rows, checks)
    bad = [c for c in checks if not c[-1]]
    print(f"variant bit checks: {len(checks) - len(bad)} equal, {len(bad)} differ: {bad}")
    if args.host:
        host_overhead(args.out)
    for name in args.profile:
        profile_fwd_bwd(WORKLOADS[name], args.out)
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump({"rows": rows, "checks": checks}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
