"""Kernel-level GPU probe of the CuPy forward: every variant against torchvision, the Triton
backend and the backend's own choice, on every bench workload, in one run; each variant checked
bit for bit against the plane kernel.

Not a benchmark of record (that is ``python -m roi_ops bench``): this times the kernels alone
(preallocated outputs, no roi_ops dispatch, value checks not involved). Run on the GPU machine:

    python backends/cupy/tools/probe.py [--workload many-small ...] [--dtype float32 ...]
        [--layout nchw channels_last] [--variant auto unit small ...] [--ab OTHER/cuda]
        [--sort-rois]
    python backends/cupy/tools/probe.py --ncu many-small    # a few launches each, for ncu -k
        [--dtype float16] [--layout channels_last]             # (the first of each)
    python backends/cupy/tools/probe.py --host              # host microseconds per call

A variant is a `CupyTuning` (`VARIANTS`): a forced kernel runs only where it can run, so a
variant that cannot run on a layout is left out of that row. ``--ab DIR`` adds variant ``ab``:
the backend's choice compiled from the kernel files in DIR (another checkout's
``roi_ops_cupy/cuda``, with the same kernel arguments); several folders add a variant each,
named after the folder above each ``cuda/``. ``--sort-rois`` orders each workload's
ROIs by image and position (torchvision gets the same ROIs). Times are medians over samples of
`--inner` back-to-back launches between two CUDA events; the table prints milliseconds with
argmax / without, and torchvision's time over each (higher is faster than torchvision).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from roi_ops.backend import RoIPoolProblem
from roi_ops.bench.runner import interleaved_host_us, time_calls
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois
from roi_ops.device_info import cuda_sizes

from roi_ops_cupy import kernels, launch, planning
from roi_ops_cupy.tuning import DEFAULT_TUNING, CupyTuning

VARIANTS: dict[str, CupyTuning] = {
    "auto": DEFAULT_TUNING,
    "plane": replace(DEFAULT_TUNING, forward_kernel=kernels.FORWARD_PLANE),
    "unit": replace(DEFAULT_TUNING, forward_kernel=kernels.FORWARD_UNIT),
    "unit-2k": replace(
        DEFAULT_TUNING, forward_kernel=kernels.FORWARD_UNIT, unit_block_elements_streamed=2048
    ),
    "unit-4k": replace(
        DEFAULT_TUNING, forward_kernel=kernels.FORWARD_UNIT, unit_block_elements_streamed=4096
    ),
    "cvec": replace(DEFAULT_TUNING, forward_kernel=kernels.FORWARD_CVEC),
    "cvec_wide": replace(DEFAULT_TUNING, forward_kernel=kernels.FORWARD_CVEC_WIDE),
    "cvec_wide_tile32": replace(
        DEFAULT_TUNING, forward_kernel=kernels.FORWARD_CVEC_WIDE, cvec_wide_tile_bytes=32768
    ),
    "chan": replace(DEFAULT_TUNING, forward_kernel=kernels.FORWARD_CHAN),
    "small": replace(DEFAULT_TUNING, forward_kernel=kernels.FORWARD_SMALL),
    "small_cvec": replace(DEFAULT_TUNING, forward_kernel=kernels.FORWARD_SMALL_CVEC),
    "small-2k": replace(
        DEFAULT_TUNING, forward_kernel=kernels.FORWARD_SMALL, small_block_elements=2048
    ),
    "small-8k": replace(
        DEFAULT_TUNING, forward_kernel=kernels.FORWARD_SMALL, small_block_elements=8192
    ),
}
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def pipelined_ms(fn, reps: int, inner: int) -> float:
    """Median over `reps` samples of `inner` back-to-back calls (the bench's own timer)."""
    return time_calls(
        fn, torch.device("cuda"), 0.0, min_reps=reps, max_reps=reps, queue=inner
    ).median


class Variant:
    """One forward variant: a tuning, and the kernels it runs with (compiled from `source`)."""

    def __init__(self, name: str, tuning: CupyTuning, source: str | None = None):
        self.name = name
        self.tuning = tuning
        self.source = source
        self.kernels: dict = {}  # the compiled kernels of another source, kept alive

    def runner(self, problem, out, arg):
        """A call that launches the variant's kernel on `problem`, or None where its forced
        kernel cannot run (it would fall back to another)."""
        forced = self.tuning.forward_kernel
        bins = problem.pooled_height * problem.pooled_width
        if (
            forced is not None
            and planning.forward_kernel(problem.input, bins, self.tuning) != forced
        ):
            return None
        device = problem.input.get_device()
        plan = planning.plan_forward(problem, out, arg, cuda_sizes(device), self.tuning)
        packed = self._pack(device, plan)
        tensors = (problem.input, problem.rois, out, arg, None)
        return lambda: packed.launch(device, tensors)

    def _pack(self, device, plan):
        if self.source is None:
            return launch.PackedLaunch(device, plan, launch.FORWARD_TENSORS)
        with compiled_from(self.source, self.kernels):
            return launch.PackedLaunch(device, plan, launch.FORWARD_TENSORS)


def folder_source(folder: str) -> str:
    """The kernel source of another ``cuda/`` folder, joined as `kernels.source` joins ours."""
    return "\n".join((Path(folder) / name).read_text() for name in kernels.SOURCE_FILES)


@contextmanager
def compiled_from(source: str, cache: dict) -> Iterator[None]:
    """Kernels compiled inside the block come from `source` and are kept in `cache`, apart from
    the backend's own compiled kernels, which are restored afterwards."""
    own, own_source = dict(launch._kernels), kernels.source
    launch._kernels.clear()
    launch._kernels.update(cache)
    kernels.source = lambda: source
    try:
        yield
    finally:
        cache.update(launch._kernels)
        launch._kernels.clear()
        launch._kernels.update(own)
        kernels.source = own_source


def tie_heavy(x: torch.Tensor) -> torch.Tensor:
    """Small integers (many ties), some -0.0, NaN and -inf: exercises the ordering rules."""
    g = torch.Generator().manual_seed(7)
    values = torch.randint(-3, 3, x.shape, generator=g).to(torch.float32)
    zeros = values == 0
    values[zeros] = -0.0 * (torch.rand(int(zeros.sum()), generator=g) < 0.5).float()
    special = torch.rand(x.shape, generator=g)
    values[special < 0.001] = float("nan")
    values[special > 0.999] = float("-inf")
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    return values.to(x.dtype).to(x.device).contiguous(memory_format=fmt)


def bits(t):
    return t.view(_BITS[t.element_size()])


def probe(w, dtype, layout, variants, args, rows, mismatches):
    device = torch.device("cuda")
    x = make_input(w, dtype, device, channels_last=layout == "channels_last")
    rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, device)
    if args.sort_rois:  # by image, then 32-pixel bands of y1, then x1: neighbours adjacent
        key = rois[:, 0].double() * 1e9 + (rois[:, 2].double() / 32).floor() * 1e5 + rois[:, 1]
        rois = rois[key.argsort()].contiguous()
    size = w.output_size
    shape = (rois.shape[0], w.channels, size, size)
    out = torch.empty(shape, dtype=dtype, device=device)
    arg = torch.empty(shape, dtype=torch.int32, device=device)
    with_argmax = RoIPoolProblem(x, rois, size, size, w.spatial_scale, True)
    inference = RoIPoolProblem(x, rois, size, size, w.spatial_scale, False)
    ms: dict[str, tuple[float, float]] = {}
    for variant in variants:
        run_arg = variant.runner(with_argmax, out, arg)
        run_inf = variant.runner(inference, out, None)
        if run_arg is None:
            continue
        ms[variant.name] = (
            pipelined_ms(run_arg, args.reps, args.inner),
            pipelined_ms(run_inf, args.reps, args.inner),
        )
    if args.triton:
        try:
            from roi_ops_triton.backend import TritonBackend

            triton = TritonBackend()
            ms["triton"] = (
                pipelined_ms(lambda: triton.forward(with_argmax, out, arg), args.reps, args.inner),
                pipelined_ms(lambda: triton.forward(inference, out, None), args.reps, args.inner),
            )
        except ImportError:
            pass
    tv = None
    if dtype != torch.bfloat16:
        try:
            from torchvision.ops import roi_pool as torchvision_roi_pool

            rois_tv = rois.to(dtype)
            tv = pipelined_ms(
                lambda: torchvision_roi_pool(x, rois_tv, size, w.spatial_scale),
                args.reps,
                args.inner,
            )
        except ImportError:
            pass
    # Bits: every variant against the plane kernel, with and without argmax.
    for inputs in ("normal", "ties"):
        xi = x if inputs == "normal" else tie_heavy(x)
        problem = RoIPoolProblem(xi, rois, size, size, w.spatial_scale, True)
        quiet = RoIPoolProblem(xi, rois, size, size, w.spatial_scale, False)
        ref_out = torch.full_like(out, float("nan"))
        ref_arg = torch.full_like(arg, -7)
        Variant("plane", VARIANTS["plane"]).runner(problem, ref_out, ref_arg)()
        for variant in variants:
            o, a, o2 = (
                torch.full_like(out, 1.5),
                torch.full_like(arg, -7),
                torch.full_like(out, 2.5),
            )
            run_arg = variant.runner(problem, o, a)
            if run_arg is None:
                continue
            run_arg()
            variant.runner(quiet, o2, None)()
            same = (
                torch.equal(bits(o), bits(ref_out))
                and torch.equal(a, ref_arg)
                and torch.equal(bits(o2), bits(ref_out))
            )
            if not same:
                mismatches.append((w.name, str(dtype)[6:], layout, inputs, variant.name))
    row = {"workload": w.name, "dtype": str(dtype)[6:], "layout": layout, "tv": tv, "ms": ms}
    rows.append(row)
    cells = [f"tv {tv:.3f}" if tv else "tv -"]
    for name, (a_ms, i_ms) in ms.items():
        ratio = f" {tv / a_ms:.2f}x/{tv / i_ms:.2f}x" if tv else ""
        cells.append(f"{name} {a_ms:.3f}/{i_ms:.3f}{ratio}")
    print(f"{w.name:10} {str(dtype)[6:]:8} {layout:13} " + "  ".join(cells), flush=True)


def ncu_target(name: str, variants, dtype: torch.dtype, layout: str) -> None:
    """Two launches of each variant with the argmax and two without, and two of torchvision, on
    one workload in `dtype` and `layout`, for ``ncu -k regex:...``."""
    w = WORKLOADS[name]
    device = torch.device("cuda")
    x = make_input(w, dtype, device, channels_last=layout == "channels_last")
    rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, device)
    size = w.output_size
    fns = []
    for argmax in (True, False):
        problem = RoIPoolProblem(x, rois, size, size, w.spatial_scale, argmax)
        out = torch.empty(problem.output_shape, dtype=dtype, device=device)
        arg = torch.empty(problem.output_shape, dtype=torch.int32, device=device)
        fns += [v.runner(problem, out, arg if argmax else None) for v in variants]
    if dtype != torch.bfloat16:
        try:
            from torchvision.ops import roi_pool as tv

            fns.append(lambda: tv(x, rois, size, w.spatial_scale))
        except ImportError:
            pass
    for fn in fns:
        if fn is not None:
            fn()
            fn()
    torch.cuda.synchronize()


def host_overhead(calls: int = 2000) -> None:
    """Host microseconds per call on a small problem (its GPU time is negligible): the backend's
    forward and backward methods, and whole roi_pool calls against torchvision's; the median of
    samples of 200 calls, `calls` calls of each in all, taken in turn."""
    import roi_ops
    from roi_ops.backend import RoIPoolBackwardProblem

    from roi_ops_cupy.backend import CupyBackend

    device = torch.device("cuda")
    x = torch.randn(2, 256, 50, 68, device=device)
    rois = make_rois(WORKLOADS["frcnn-c4"], torch.float32, device)[:64]
    backend = CupyBackend()
    problem = RoIPoolProblem(x, rois, 7, 7, 1 / 16, True)
    out = torch.empty(problem.output_shape, device=device)
    arg = torch.empty(problem.output_shape, dtype=torch.int32, device=device)
    grad = torch.randn(problem.output_shape, device=device)
    backward = RoIPoolBackwardProblem(grad, arg, rois, tuple(x.shape), x.dtype)
    leaf = x.detach().requires_grad_(True)
    calls_by_name = {
        "backend.forward": lambda: backend.forward(problem, out, arg),
        "backend.backward": lambda: backend.backward(backward),
        "roi_pool inference": lambda: roi_ops.roi_pool(x, rois, 7, 1 / 16),
        "roi_pool forward": lambda: roi_ops.roi_pool(leaf, rois, 7, 1 / 16),
    }
    try:
        from torchvision.ops import roi_pool as tv

        calls_by_name["torchvision inference"] = lambda: tv(x, rois, 7, 1 / 16)
        calls_by_name["torchvision forward"] = lambda: tv(leaf, rois, 7, 1 / 16)
    except ImportError:
        pass
    timings = interleaved_host_us(
        list(calls_by_name.values()), device, budget_s=0.0, calls=200, min_rounds=calls // 200
    )
    for label, timing in zip(calls_by_name, timings, strict=True):
        print(f"host {label}: {timing.median:.1f} us per call")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--dtype", nargs="*", default=["float32", "float16", "bfloat16"])
    parser.add_argument("--layout", nargs="*", default=["nchw"], choices=["nchw", "channels_last"])
    parser.add_argument("--variant", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--ab", nargs="*", default=[], help="other cuda/ folders: variant 'ab', or one per folder"
    )
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--no-triton", dest="triton", action="store_false")
    parser.add_argument(
        "--sort-rois", action="store_true", help="ROIs ordered by image and position"
    )
    parser.add_argument("--json", default=None, help="write the rows and bit checks here")
    parser.add_argument("--ncu", default=None, help="only run the ncu target for a workload")
    parser.add_argument("--host", action="store_true", help="only time host overhead per call")
    args = parser.parse_args()
    if args.host:
        host_overhead()
        return 0
    variants = [Variant(name, VARIANTS[name]) for name in args.variant]
    for folder in args.ab:
        name = "ab" if len(args.ab) == 1 else Path(folder).resolve().parent.name
        variants.append(Variant(name, DEFAULT_TUNING, folder_source(folder)))
    if args.ncu:
        ncu_target(args.ncu, variants, getattr(torch, args.dtype[0]), args.layout[0])
        return 0
    rows, mismatches = [], []
    for name in args.workload:
        for dtype in args.dtype:
            for layout in args.layout:
                probe(WORKLOADS[name], getattr(torch, dtype), layout, variants, args, rows,
                      mismatches)  # fmt: skip
    print(f"bit checks: {len(mismatches)} mismatches {mismatches}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "mismatches": mismatches}, handle, indent=1)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
