"""Backward alone on the bench workloads: the CuPy backend's chosen kernel against each forced
variant, Triton's backward and torchvision's backward op.

Not a benchmark of record (that is ``python -m roi_ops bench``). Run on the GPU machine:

    python backends/cupy/tools/backward_probe.py [--workload NAME...] [--no-triton] [--ab DIR]

Prints, per workload and dtype, the kernel `planning.backward_kernel` picks and the median time
of a backward call (allocation, kernel and rounding, ten calls queued per sample) with that
choice and with each variant of `VARIANTS` (a `CupyTuning` each; the atomic one where the planes
kernel cannot run), the largest difference between the chosen and the atomic result, then the
Triton backend's backward and torchvision's ``_roi_pool_backward`` on its own argmax.
``--ab DIR`` adds variant ``ab``: the chosen kernel compiled from another ``cuda/`` folder (an
A/B of a kernel change in one run), with its largest difference from the chosen result.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from probe import compiled_from, folder_source
from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem
from roi_ops.bench.runner import time_calls
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois
from roi_ops.device_info import cuda_sizes

from roi_ops_cupy import kernels, planning
from roi_ops_cupy.backend import CupyBackend
from roi_ops_cupy.launch import Launcher
from roi_ops_cupy.tuning import DEFAULT_TUNING

ATOMIC = replace(DEFAULT_TUNING, backward_kernel=kernels.BACKWARD_ATOMIC)
VARIANTS = {
    "chosen": DEFAULT_TUNING,
    "atomic": ATOMIC,
    "atomic, 2048-output blocks": replace(ATOMIC, backward_block_elements_streamed=2048),
    **{
        f"planes {t}": replace(
            DEFAULT_TUNING, backward_kernel=kernels.BACKWARD_PLANES, planes_threads=t
        )
        for t in kernels.PLANES_THREADS
    },
    "planes, scanning": replace(DEFAULT_TUNING, backward_kernel=kernels.BACKWARD_PLANES),
    "planes, grouped": replace(DEFAULT_TUNING, backward_kernel=kernels.BACKWARD_PLANES_GROUPED),
}


class OtherSource:
    """A Launcher whose kernels are compiled from another ``cuda/`` folder, apart from the
    backend's own kernel cache (its launches are planned, compiled and cached on first use)."""

    def __init__(self, folder: str):
        self.source = folder_source(folder)
        self.kernels: dict = {}
        self.launcher = Launcher(DEFAULT_TUNING)

    def backward(self, problem):
        with compiled_from(self.source, self.kernels):
            return self.launcher.backward(problem)


def timed_ms(fn) -> float:
    return time_calls(fn, torch.device("cuda"), 0.6, min_reps=5, queue=10).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--ab", default=None, help="another cuda/ folder: variant 'ab'")
    options = parser.parse_args()
    other = OtherSource(options.ab) if options.ab else None
    device = torch.device("cuda")
    backend = CupyBackend()
    for name in options.workload:
        w = WORKLOADS[name]
        size = w.output_size
        for dtype in (torch.float32, torch.float16):
            x = make_input(w, dtype, device)
            rois = make_rois(w, dtype, device)
            shape = tuple(x.shape)
            out_shape = (rois.shape[0], w.channels, size, size)
            out = torch.empty(out_shape, dtype=dtype, device=device)
            argmax = torch.empty(out_shape, dtype=torch.int32, device=device)
            backend.forward(RoIPoolProblem(x, rois, size, size, w.spatial_scale, True), out, argmax)
            grad = torch.randn(out_shape, device=device).to(dtype)
            problem = RoIPoolBackwardProblem(grad, argmax, rois, shape, dtype)
            sizes = cuda_sizes(device.index or 0)
            chosen = planning.backward_kernel(shape, dtype, out_shape, sizes)
            results, row = {}, {}
            for label, tuning in VARIANTS.items():
                launcher = Launcher(tuning)
                results[label] = launcher.backward(problem)
                row[label] = timed_ms(lambda run=launcher.backward, p=problem: run(p))
            diff = float((results["chosen"].double() - results["atomic"].double()).abs().max())
            if other is not None:
                ab = other.backward(problem).double()
                diff_ab = float((results["chosen"].double() - ab).abs().max())
                row["ab"] = timed_ms(lambda p=problem: other.backward(p))
                again = Launcher()
                row["chosen again"] = timed_ms(lambda run=again.backward, p=problem: run(p))
            times = "  ".join(f"{k} {v:.3f} ms" for k, v in row.items())
            print(f"{name:10} {str(dtype)[6:]:8} {chosen:25} {times}  max diff {diff:.3g}")
            if other is not None:
                print(f"{'':45} ab max diff from chosen {diff_ab:.3g}")
            if not options.no_triton:
                print(f"{'':45} {triton_time(problem)}")
            print(f"{'':45} {torchvision_time(x, rois, w, grad)}")


def triton_time(problem: RoIPoolBackwardProblem) -> str:
    try:
        from roi_ops_triton.backend import TritonBackend
    except ImportError:
        return "triton missing"
    backend = TritonBackend()
    return f"triton {timed_ms(lambda: backend.backward(problem)):.3f} ms"


def torchvision_time(x, rois, w, grad) -> str:
    if x.dtype == torch.bfloat16:
        return ""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return "torchvision missing"
    size = w.output_size
    rois = rois.to(x.dtype)
    _, argmax = torch.ops.torchvision.roi_pool(x, rois, w.spatial_scale, size, size)
    n, c, h, wd = x.shape
    op = torch.ops.torchvision._roi_pool_backward
    ms = timed_ms(lambda: op(grad, rois, argmax, w.spatial_scale, size, size, n, c, h, wd))
    return f"torchvision {ms:.3f} ms"


if __name__ == "__main__":
    main()
