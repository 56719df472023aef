"""Triton kernels on the GPU: old against new against torchvision, and tuning variants.

Developer tool (needs a CUDA device, torchvision, and the old kernels). Two reports:

``kernels``: for every bench workload (many-small included), float32 and float16, NCHW and
channels_last: median kernel times (``triton.testing.do_bench``) of the forward with argmax,
inference and backward, for torchvision, the old Triton kernels (``--old``), the new ones at
the default tuning and at each ``--variant``; and whether old and new give identical bits
(outputs, argmax, and gradients from small integer gradients, whose sums are exact).

``multi``: the bench's fpn-multi workload (P2-P5 of 800x1088, N=8, C=256, 8,000 boxes, 7x7),
NCHW and channels_last, float32 and float16: median times of inference, forward and
forward+backward of roi_ops' one call on the Triton backend (fused: one launch per direction)
against torchvision's per-level loop over ``torchvision.ops.roi_pool`` and over
``roi_ops.roi_pool(backend="triton")``, and whether the fused call and the torch backend give
the same bits (outputs and, from small integer gradients, gradients).

``host``: host microseconds per call of a small problem (N=2, C=256, 50x68, K=64, 7x7,
float32, scale 1/16), calls queued: the new Runner (plan and launch caches), the same with the
launch cache emptied before every call (Triton binds each launch), the old kernels, the CuPy
backend's forward if installed, and torchvision.

The old kernels are the single-file module this package replaced: ``--old REV`` reads
``kernels.py`` and ``launcher.py`` from git revision REV (default fad8121, the last commit
with them), ``--old DIR`` from a folder holding those two files.

Usage (each well under ten minutes on an H200):
    python backends/triton/tools/probe.py kernels
    python backends/triton/tools/probe.py kernels --workload many-small --variant l128w4 l64w2 \
        l32w1 c2 c1 l64w2c2 l128w4c2 l256w4
    python backends/triton/tools/probe.py multi
    python backends/triton/tools/probe.py host
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem
from roi_ops.bench.runner import interleaved_host_us
from roi_ops.bench.workloads import WORKLOADS, Workload, make_input, make_rois
from roi_ops_triton import launch, launch_cache
from roi_ops_triton.tuning import DEFAULT_TUNING

OLD_REVISION = "fad8121"
# Tuning variants for the unit kernel on small ROIs (many-small: 9 bins, 64 channels): fewer
# lanes per program, fewer channels per lane, so that rounds of channels waste fewer lanes.
VARIANTS = {
    "l128w4": dict(unit_lanes=128, unit_warps=4),
    "l64w2": dict(unit_lanes=64, unit_warps=2),
    "l32w1": dict(unit_lanes=32, unit_warps=1),
    "c2": dict(unit_channels=2),
    "c1": dict(unit_channels=1),
    "l64w2c2": dict(unit_lanes=64, unit_warps=2, unit_channels=2),
    "l128w4c2": dict(unit_lanes=128, unit_warps=4, unit_channels=2),
    "l256w4": dict(unit_warps=4),
}


def load_old(source: str):
    """The old kernels module, from a git revision or a folder with kernels.py and launcher.py."""
    folder = Path(tempfile.mkdtemp(prefix="old_roi_ops_triton_")) / "old_roi_ops_triton"
    folder.mkdir()
    for name in ("kernels.py", "launcher.py"):
        if Path(source).is_dir():
            text = (Path(source) / name).read_text()
        else:
            path = f"{source}:backends/triton/roi_ops_triton/{name}"
            text = subprocess.run(
                ["git", "show", path], check=True, capture_output=True, text=True
            ).stdout
        # The old launcher read its switch through roi_ops.config, which may have changed.
        text = text.replace("from roi_ops.config import env_flag\n", "")
        text = text.replace("enabled = env_flag(FAST_LAUNCH_ENV)", "enabled = True")
        (folder / name).write_text(text)
    (folder / "__init__.py").write_text("")
    sys.path.insert(0, str(folder.parent))
    spec = importlib.util.spec_from_file_location(
        "old_roi_ops_triton", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["old_roi_ops_triton"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("old_roi_ops_triton.kernels")


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)


def kernels_report(args) -> None:
    import torchvision  # noqa: F401

    old = load_old(args.old)
    runners = {"new": launch.Runner(DEFAULT_TUNING)}
    for name in args.variant:
        runners[name] = launch.Runner(dataclasses.replace(DEFAULT_TUNING, **VARIANTS[name]))
    device = torch.device("cuda")
    header = ["workload", "dtype", "layout", "mode", "tv ms", "old ms", *runners, "tv/new", "same"]
    print(" | ".join(header))
    for name in args.workload:
        w = WORKLOADS[name]
        for dtype in (torch.float32, torch.float16):
            rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, device)
            for channels_last in (False, True):
                x = make_input(w, dtype, device, channels_last=channels_last)
                _compare(w, x, rois, old, runners, device, channels_last)


def _compare(w, x, rois, old, runners, device, channels_last) -> None:
    size, scale = w.output_size, w.spatial_scale
    k, (n, c, h, wd) = rois.shape[0], x.shape
    shape = (k, c, size, size)
    out = torch.empty(shape, dtype=x.dtype, device=device)
    arg = torch.empty(shape, dtype=torch.int32, device=device)
    ref_out = torch.empty_like(out)
    ref_arg = torch.empty_like(arg)
    layout = "channels_last" if channels_last else "nchw"
    runs = list(runners.items())

    def new_forward(runner, argmax):
        problem = RoIPoolProblem(x, rois, size, size, scale, argmax is not None)
        return lambda: runner.forward(problem, out, argmax)

    def old_forward(argmax):
        return lambda: old.roi_pool_forward(x, rois, size, size, scale, ref_out, argmax)

    old_forward(ref_arg)()
    runners["new"].forward(RoIPoolProblem(x, rois, size, size, scale, True), out, arg)
    same_forward = same_bits(out, ref_out) and torch.equal(arg, ref_arg)

    # Backward with small integer gradients: every float sum is exact, in any order.
    grad = torch.randint(1, 4, shape, device=device).to(x.dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    backward_problem = RoIPoolBackwardProblem(
        grad, arg, rois, (n, c, h, wd), x.dtype, memory_format
    )

    def old_backward():
        batch = rois[:, 0].to(torch.int64).clamp_(0, n - 1)  # what the old backend was given
        return old.roi_pool_backward(grad, arg, batch, (n, c, h, wd), x.dtype, memory_format)

    same = same_forward and torch.equal(
        old_backward().float().contiguous(),
        runners["new"].backward(backward_problem).float().contiguous(),
    )

    def new_backward(runner):
        return lambda: runner.backward(backward_problem)

    def tv_forward():
        return torch.ops.torchvision.roi_pool(x, rois, scale, size, size)

    _, tv_arg = tv_forward()

    def tv_backward():
        return torch.ops.torchvision._roi_pool_backward(
            grad, rois, tv_arg, scale, size, size, n, c, h, wd
        )

    rows = {
        "fwd": (tv_forward, old_forward(ref_arg), {r: new_forward(v, arg) for r, v in runs}),
        "infer": (tv_forward, old_forward(None), {r: new_forward(v, None) for r, v in runs}),
        "bwd": (tv_backward, old_backward, {r: new_backward(v) for r, v in runs}),
    }
    for mode, (tv, old_fn, new_fns) in rows.items():
        tv_ms, old_ms = bench_ms(tv), bench_ms(old_fn)
        news = {r: bench_ms(fn) for r, fn in new_fns.items()}
        cells = [w.name, str(x.dtype).removeprefix("torch."), layout, mode, f"{tv_ms:.3f}",
                 f"{old_ms:.3f}", *(f"{v:.3f}" for v in news.values()),
                 f"{tv_ms / news['new']:.2f}x", "yes" if same else "NO"]  # fmt: skip
        print(" | ".join(cells), flush=True)


def multi_report(args) -> None:
    from roi_ops.bench.pyramid import FPN_MULTI, make_boxes, make_pyramid
    from roi_ops.bench.runner import torchvision_roi_pool

    tv = torchvision_roi_pool()
    device = torch.device("cuda")
    w = FPN_MULTI
    size, scales = w.output_size, w.spatial_scales
    print(f"{w.name}: {w.describe()}")
    print("dtype | layout | mode | fused ms | loop tv ms | loop triton ms | tv loop/fused | same")
    for dtype in (torch.float32, torch.float16):
        rois = make_boxes(w, dtype, device)
        for channels_last in (False, True):
            features = make_pyramid(w, dtype, device)
            if channels_last:
                features = [f.contiguous(memory_format=torch.channels_last) for f in features]
            leaves = [f.detach().requires_grad_(True) for f in features]
            grad = torch.randint(1, 4, (w.num_rois, w.channels, size, size), device=device)
            grad = grad.to(dtype)
            calls = _multi_calls(tv, rois, size, scales)
            same = _multi_same(features, rois, size, scales, grad)
            layout = "channels_last" if channels_last else "nchw"
            for mode in ("infer", "fwd", "fwd+bwd"):
                times = {}
                for name, call in calls.items():
                    times[name] = bench_ms(_multi_mode(mode, call, features, leaves, grad))
                print(
                    f"{str(dtype).removeprefix('torch.')} | {layout} | {mode} | "
                    f"{times['fused']:.3f} | {times['loop tv']:.3f} | "
                    f"{times['loop triton']:.3f} | {times['loop tv'] / times['fused']:.2f}x | "
                    f"{'yes' if same else 'NO'}",
                    flush=True,
                )


def _multi_calls(tv, rois, size, scales) -> dict:
    """The compared calls, each of the feature levels."""
    import roi_ops
    from roi_ops.bench.pyramid import level_loop

    def fused(features):
        return roi_ops.multi_scale_roi_pool(features, rois, size, scales, backend="triton")

    def loop_torchvision(features):
        pool = lambda x, b, o, scale: tv(x, b.to(x.dtype), o, scale)  # noqa: E731
        return level_loop(pool, features, rois, size, scales)

    def loop_triton(features):
        pool = lambda x, b, o, scale: roi_ops.roi_pool(x, b, o, scale, backend="triton")  # noqa: E731
        return level_loop(pool, features, rois, size, scales)

    return {"fused": fused, "loop tv": loop_torchvision, "loop triton": loop_triton}


def _multi_mode(mode, call, features, leaves, grad):
    if mode == "infer":

        def infer():
            with torch.no_grad():
                call(features)

        return infer
    if mode == "fwd":
        return lambda: call(leaves)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        call(leaves).backward(grad)

    return forward_backward


def _multi_same(features, rois, size, scales, grad) -> bool:
    """Whether the fused Triton call and the torch backend give the same bits, forward and
    backward (integer gradients: exact sums in any order)."""
    import roi_ops

    results = []
    for backend in ("triton", "torch"):
        leaves = [f.detach().requires_grad_(True) for f in features]
        output = roi_ops.multi_scale_roi_pool(leaves, rois, size, scales, backend=backend)
        output.backward(grad)
        results.append((output.detach(), [leaf.grad for leaf in leaves]))
    (fused, fused_grads), (torch_out, torch_grads) = results
    return same_bits(fused, torch_out) and all(
        same_bits(a.contiguous(), b.contiguous())
        for a, b in zip(fused_grads, torch_grads, strict=True)
    )


def host_report(args) -> None:
    old = load_old(args.old)
    device = torch.device("cuda")
    small = Workload("small", 2, 256, 50, 68, 64, 7, 1 / 16, 16, 512)
    x = make_input(small, torch.float32, device)
    rois = make_rois(small, torch.float32, device)
    out = torch.empty(64, 256, 7, 7, device=device)
    arg = torch.empty(64, 256, 7, 7, dtype=torch.int32, device=device)
    runner = launch.Runner()
    problem = RoIPoolProblem(x, rois, 7, 7, 1 / 16, True)

    def bound():
        launch_cache.clear()
        runner.forward(problem, out, arg)

    calls = {
        "new (cached)": lambda: runner.forward(problem, out, arg),
        "new (Triton binds)": bound,
        "old": lambda: old.roi_pool_forward(x, rois, 7, 7, 1 / 16, out, arg),
    }
    try:
        from roi_ops_cupy.backend import CupyBackend

        cupy = CupyBackend()
        if cupy.check_available() is None:
            calls["cupy backend"] = lambda: cupy.forward(problem, out, arg)
    except ImportError:
        pass
    try:
        import torchvision  # noqa: F401

        calls["torchvision"] = lambda: torch.ops.torchvision.roi_pool(x, rois, 1 / 16, 7, 7)
    except ImportError:
        pass
    # The median of 15 samples of 200 calls of each, taken in turn.
    timings = interleaved_host_us(
        list(calls.values()), device, budget_s=0.0, calls=200, min_rounds=15
    )
    for name, timing in zip(calls, timings, strict=True):
        print(f"{name:22s} {timing.median:7.1f} us host per call", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", choices=("kernels", "multi", "host"))
    parser.add_argument("--old", default=OLD_REVISION, help="git revision or folder")
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument(
        "--variant", nargs="*", default=[], choices=list(VARIANTS),
        help="tuning variants timed beside the default tuning",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    reports = {"kernels": kernels_report, "multi": multi_report, "host": host_report}
    reports[args.report](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
