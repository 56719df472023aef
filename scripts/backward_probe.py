"""CuPy backward alone on the five workloads: the chosen kernel against the atomic kernel.

Not a benchmark of record (that is ``python -m roi_ops bench``). Run on the GPU machine:

    python scripts/backward_probe.py

Prints, per workload and dtype, the kernel `kernels.backward_kernel` picks, the median time of
``launch.backward`` (allocation, kernel and rounding, ten calls queued per sample) with that
choice, with the atomic kernel forced, and with the atomic kernel's old channel blocks, and the
largest difference between the first two results.
"""

from __future__ import annotations

import os

import torch
from roi_ops_cupy import kernels, launch

from roi_ops.bench.runner import median_time_ms
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois
from roi_ops.config import value_checks
from roi_ops.ops import batch_indices, roi_pool_forward


def main() -> None:
    device = torch.device("cuda")

    def timed(fn) -> float:
        return median_time_ms(fn, device, 0.6, min_reps=5, queue=10)

    for name, w in WORKLOADS.items():
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
            del os.environ["ROI_OPS_CUPY_BACKWARD"]
            diff = float((result.double() - atomic.double()).abs().max())
            times = "  ".join(f"{k} {v:.3f} ms" for k, v in row.items())
            print(f"{name:10} {str(dtype)[6:]:8} {chosen:25} {times}  max diff {diff:.3g}")


if __name__ == "__main__":
    main()
