"""Backward alone on the five workloads: CuPy's chosen kernel against its atomic kernel, the
Triton backward (with a few block sizes) and torchvision's backward op.

Not a benchmark of record (that is ``python -m roi_ops bench``). Run on the GPU machine:

    python scripts/backward_probe.py [--workload NAME...] [--no-triton]

Prints, per workload and dtype, the kernel `kernels.backward_kernel` picks, the median time of
``launch.backward`` (allocation, kernel and rounding, ten calls queued per sample) with that
choice, with the atomic kernel forced, with the atomic kernel's old channel blocks and with the
planes kernel forced (blocks of 256 and 1024 threads; the atomic one where planes cannot run), the
largest difference between the first two results, then the Triton backward
(``kernels.roi_pool_backward``: zero fill, kernel, rounding) with the block it picks and with
fixed blocks, and torchvision's ``_roi_pool_backward`` on its own argmax.
"""

from __future__ import annotations

import argparse
import os

import torch
from roi_ops_cupy import kernels, launch

from roi_ops.bench.runner import median_time_ms
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois
from roi_ops.config import value_checks
from roi_ops.ops import batch_indices, roi_pool_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--no-triton", action="store_true")
    options = parser.parse_args()
    device = torch.device("cuda")

    def timed(fn) -> float:
        return median_time_ms(fn, device, 0.6, min_reps=5, queue=10)

    for name in options.workload:
        w = WORKLOADS[name]
        for dtype in (torch.float32, torch.float16):
            x = make_input(w, dtype, device)
            rois = make_rois(w, dtype, device)
            shape = tuple(x.shape)
            size = w.output_size
            with value_checks(False):
                _, argmax = roi_pool_forward(x, rois, size, size, w.spatial_scale, "cupy", True)
            index = batch_indices(rois, shape[0])
            grad = torch.randn(argmax.shape, device=device).to(dtype)
            sms, _, shared = launch._device_sizes(device.index or 0)
            chosen = kernels.backward_kernel(shape, dtype, tuple(argmax.shape), sms, shared)

            def run(grad=grad, argmax=argmax, index=index, shape=shape, dtype=dtype):
                return launch.backward(grad, argmax, index, shape, dtype)

            result = run()
            row = {"chosen": timed(run)}
            os.environ["ROI_OPS_CUPY_BACKWARD"] = "atomic"
            atomic = run()
            row["atomic"] = timed(run)
            streamed = kernels.BACKWARD_BLOCK_ELEMENTS_STREAMED
            kernels.BACKWARD_BLOCK_ELEMENTS_STREAMED = kernels.TARGET_BLOCK_ELEMENTS
            row["atomic, old blocks"] = timed(run)
            kernels.BACKWARD_BLOCK_ELEMENTS_STREAMED = streamed
            os.environ["ROI_OPS_CUPY_BACKWARD"] = "planes"
            for threads in kernels.PLANES_THREADS:  # where the planes kernel can run at all
                os.environ["ROI_OPS_CUPY_PLANES_THREADS"] = str(threads)
                row[f"planes {threads}"] = timed(run)
            del os.environ["ROI_OPS_CUPY_PLANES_THREADS"]
            del os.environ["ROI_OPS_CUPY_BACKWARD"]
            diff = float((result.double() - atomic.double()).abs().max())
            times = "  ".join(f"{k} {v:.3f} ms" for k, v in row.items())
            print(f"{name:10} {str(dtype)[6:]:8} {chosen:25} {times}  max diff {diff:.3g}")
            if not options.no_triton:
                print(f"{'':10} {'':8} {'':25} {triton_times(grad, argmax, index, shape, dtype)}")
            print(f"{'':10} {'':8} {'':25} {torchvision_time(x, rois, w, grad)}")


def timed_ms(fn) -> float:
    return median_time_ms(fn, torch.device("cuda"), 0.6, min_reps=5, queue=10)


def triton_times(grad, argmax, index, shape, dtype) -> str:
    from roi_ops_triton import kernels as triton_kernels

    chosen = triton_kernels.backward_block
    row = {}
    for block in (None, 512, 1024, 2048):
        if block is not None:
            triton_kernels.backward_block = lambda *_, b=block: b
        row[f"triton {block or 'chosen'}"] = timed_ms(
            lambda: triton_kernels.roi_pool_backward(grad, argmax, index, shape, dtype)
        )
        triton_kernels.backward_block = chosen
    return "  ".join(f"{k} {v:.3f} ms" for k, v in row.items())


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
