"""Kernel-level GPU probe of the CuPy backend's fused multi-level path on fpn-multi: the fused
forward and backward (one launch per direction for every level) against the backend's own
single-level launches level by level, each level's rows gathered beforehand (outside the
timing), so the difference is what fusing costs or saves in the kernels; checked bit for bit.

Not a benchmark of record (that is ``python -m roi_ops bench --workload fpn-multi``, which times
whole calls against the per-level loops over torchvision and roi_ops.roi_pool). On the GPU:

    python backends/cupy/tools/multi_probe.py [--dtype float32 float16] [--layout nchw ...]
        [--ab OTHER/cuda] [--staging]

Prints milliseconds per call (medians of `--reps` samples of `--inner` back-to-back calls) and
the level-by-level time over the fused one (above 1: the fused launch is faster). ``--ab DIR``
also times the fused forward compiled from the kernel files in DIR (another checkout's
``roi_ops_cupy/cuda``, with the same kernel arguments), in rounds alternating with this tree's,
after checking that both give the same bits: an A/B of a kernel change in one run.
``--staging`` times the fused forward (the copies included) with an NCHW pyramid staged
channels_last and not (``CupyTuning.stage_channels_last`` True and False), in rounds
alternating with the default's, after checking the bits. The backward
columns include allocating and zero-filling the gradients (and rounding the 16-bit ones), as a
call does; level by level, each level takes the kernel the single-level backward picks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace

import torch
from probe import compiled_from, folder_source
from roi_ops.backend import (
    MultiScaleRoIPoolBackwardProblem,
    MultiScaleRoIPoolProblem,
    RoIPoolBackwardProblem,
    RoIPoolProblem,
)
from roi_ops.bench.pyramid import FPN_MULTI, make_boxes, make_pyramid
from roi_ops.bench.runner import time_calls
from roi_ops.levels import level_range, roi_levels

from roi_ops_cupy import launch
from roi_ops_cupy.tuning import DEFAULT_TUNING

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def pipelined_ms(fn, device: torch.device, reps: int, inner: int) -> float:
    return time_calls(fn, device, 0.0, min_reps=reps, max_reps=reps, queue=inner).median


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(_BITS[a.element_size()]), b.view(_BITS[b.element_size()]))


def probe(
    dtype: torch.dtype,
    layout: str,
    reps: int,
    inner: int,
    workload=FPN_MULTI,
    device="cuda",
    kernels: tuple[str, ...] = (),
    ab_source: str | None = None,
    staging: bool = False,
) -> dict[str, float]:
    """Times of one dtype and layout, of the fused forward with each forward kernel of
    `kernels` forced (``fwd fused NAME``), and with `ab_source`'s kernels (``fwd fused ab``,
    against ``fwd fused tree`` timed in alternating rounds); raises AssertionError when the
    results differ."""
    w, fmt, device = workload, FORMATS[layout], torch.device(device)
    features = [x.contiguous(memory_format=fmt) for x in make_pyramid(w, dtype, device)]
    rois = make_boxes(w, torch.float32 if dtype == torch.bfloat16 else dtype, device)
    scales, size = tuple(w.spatial_scales), w.output_size
    levels = roi_levels(rois, *level_range(scales))
    launcher = launch.Launcher()
    problem = MultiScaleRoIPoolProblem(features, rois, levels, size, size, scales, True)
    out = torch.empty(problem.output_shape, dtype=dtype, device=device)
    arg = torch.empty(problem.output_shape, dtype=torch.int32, device=device)
    subs = []
    for level, x in enumerate(features):
        rows = (levels == level).nonzero().squeeze(1)
        sub = RoIPoolProblem(x, rois[rows].contiguous(), size, size, scales[level], True)
        sub_out = torch.empty(sub.output_shape, dtype=dtype, device=device)
        subs.append((rows, sub, sub_out, torch.empty_like(sub_out, dtype=torch.int32)))

    def fused():
        launcher.forward_multi_scale(problem, out, arg)

    def level_by_level():
        for _, sub, sub_out, sub_arg in subs:
            launcher.forward(sub, sub_out, sub_arg)

    fused()
    level_by_level()
    if device.type == "cuda":
        torch.cuda.synchronize()
    for rows, _, sub_out, sub_arg in subs:
        assert _same_bits(out[rows], sub_out) and torch.equal(arg[rows], sub_arg)
    times = {"fwd fused": pipelined_ms(fused, device, reps, inner)}
    times["fwd levels"] = pipelined_ms(level_by_level, device, reps, inner)
    for name in kernels:
        forced = launch.Launcher(replace(DEFAULT_TUNING, forward_kernel=name))
        forced_out, forced_arg = torch.full_like(out, 1.5), torch.full_like(arg, -7)
        forced.forward_multi_scale(problem, forced_out, forced_arg)
        assert _same_bits(forced_out, out) and torch.equal(forced_arg, arg), name
        times[f"fwd fused {name}"] = pipelined_ms(
            lambda f=forced: f.forward_multi_scale(problem, out, arg), device, reps, inner
        )
    if ab_source is not None:
        times.update(ab_forward(problem, out, arg, ab_source, fused, device, reps, inner))
    if staging:
        times.update(staged_forward(problem, out, arg, fused, device, reps, inner))

    g = torch.Generator().manual_seed(3)
    grad = torch.randint(-3, 4, out.shape, generator=g).to(dtype).to(device)  # exact sums
    shapes = tuple(tuple(x.shape) for x in features)
    backward = MultiScaleRoIPoolBackwardProblem(
        grad, arg, rois, levels, shapes, dtype, (fmt,) * len(features)
    )
    sub_backward = [
        RoIPoolBackwardProblem(grad[rows], sub_arg, sub.rois, sub.input.shape, dtype, fmt)
        for rows, sub, _, sub_arg in subs
    ]
    grads = launcher.backward_multi_scale(backward)
    for fused_grad, sub in zip(grads, sub_backward, strict=True):
        assert torch.equal(fused_grad, launcher.backward(sub))
    times["bwd fused"] = pipelined_ms(
        lambda: launcher.backward_multi_scale(backward), device, reps, inner
    )
    times["bwd levels"] = pipelined_ms(
        lambda: [launcher.backward(sub) for sub in sub_backward], device, reps, inner
    )
    return times


def alternating(calls: dict, device, reps: int, inner: int) -> dict[str, float]:
    """The median of five rounds of each of `calls` (name: a call), timed in turn in every
    round, so that the machine's drift falls on all of them alike."""
    samples = max(3, reps // 5)
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(5):
        for name, call in calls.items():
            rounds[name].append(pipelined_ms(call, device, samples, inner))
    return {name: statistics.median(values) for name, values in rounds.items()}


def ab_forward(problem, out, arg, source: str, fused, device, reps: int, inner: int):
    """The fused forward compiled from `source` against this tree's (`fused`, which last
    wrote `out` and `arg`): the same bits, then the median of five alternating rounds each."""
    other, cache = launch.Launcher(), {}
    other_out, other_arg = torch.full_like(out, 1.5), torch.full_like(arg, -7)
    with compiled_from(source, cache):
        other.forward_multi_scale(problem, other_out, other_arg)
    torch.cuda.synchronize()
    assert _same_bits(other_out, out) and torch.equal(other_arg, arg), "ab"
    # Its cached plan holds the kernel compiled from `source` (kept alive in `cache`).
    from_source = lambda: other.forward_multi_scale(problem, out, arg)  # noqa: E731
    calls = {"fwd fused tree": fused, "fwd fused ab": from_source}
    return alternating(calls, device, reps, inner)


def staged_forward(problem, out, arg, fused, device, reps: int, inner: int):
    """The fused forward staged and not (``stage_channels_last`` True and False) against the
    default's (`fused`, which last wrote `out` and `arg`): the same bits, then the median of
    five alternating rounds each (``fwd staging default``, ``... on``, ``... off``)."""
    calls = {"fwd staging default": fused}
    for name, stage in (("on", True), ("off", False)):
        launcher = launch.Launcher(replace(DEFAULT_TUNING, stage_channels_last=stage))
        other_out, other_arg = torch.full_like(out, 1.5), torch.full_like(arg, -7)
        launcher.forward_multi_scale(problem, other_out, other_arg)
        torch.cuda.synchronize()
        assert _same_bits(other_out, out) and torch.equal(other_arg, arg), name
        calls[f"fwd staging {name}"] = lambda lr=launcher: lr.forward_multi_scale(problem, out, arg)
    return alternating(calls, device, reps, inner)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"], choices=DTYPES)
    parser.add_argument("--layout", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--kernel", nargs="*", default=[], help="forced fused forward kernels")
    parser.add_argument("--ab", default=None, help="another cuda/ folder: its fused forward")
    parser.add_argument(
        "--staging", action="store_true", help="the fused forward with staging on and off"
    )
    args = parser.parse_args(argv)
    ab_source = folder_source(args.ab) if args.ab else None
    if not torch.cuda.is_available():
        print("multi_probe: needs a CUDA device", file=sys.stderr)
        return 2
    print(f"fpn-multi: {FPN_MULTI.describe()} ({torch.cuda.get_device_name()})")
    header = "dtype     layout         fwd fused  fwd levels  ratio  bwd fused  bwd levels  ratio"
    print(header)
    for dtype_name in args.dtype:
        for layout in args.layout:
            t = probe(
                DTYPES[dtype_name],
                layout,
                args.reps,
                args.inner,
                kernels=args.kernel,
                ab_source=ab_source,
                staging=args.staging,
            )
            print(
                f"{dtype_name:9s} {layout:13s} {t['fwd fused']:9.3f} {t['fwd levels']:11.3f} "
                f"{t['fwd levels'] / t['fwd fused']:6.2f} {t['bwd fused']:10.3f} "
                f"{t['bwd levels']:11.3f} {t['bwd levels'] / t['bwd fused']:6.2f}"
            )
            for name in args.kernel:
                print(f"  fused forward, {name} forced: {t[f'fwd fused {name}']:.3f} ms")
            for name, value in t.items():
                if name.startswith("fwd staging"):
                    ratio = value / t["fwd staging default"]
                    print(f"  fused forward, {name[4:]}: {value:.3f} ms ({ratio:.3f})")
            if ab_source is not None:
                tree, ab = t["fwd fused tree"], t["fwd fused ab"]
                ratio = ab / tree
                print(f"  fused forward: this tree {tree:.3f} ms, --ab {ab:.3f} ms ({ratio:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
