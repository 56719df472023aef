"""Host time per call of a tiny CUDA roi_pool, Triton launches cached (roi_ops_triton.launcher)
or bound by Triton on every call, in interleaved samples; the CuPy backend alongside.

Usage (GPU machine): python scripts/triton_launch_ab.py
"""

import statistics
import time

import torch
from roi_ops_triton import launcher

import roi_ops
from roi_ops.config import value_checks

x = torch.randn(2, 16, 16, 16, device="cuda")
rois = torch.tensor([[0, 1.0, 1.0, 10.0, 12.0]] * 8, device="cuda")
leaf = x.clone().requires_grad_()
g = torch.ones(8, 16, 7, 7, device="cuda")


def make(b):
    def fb():
        leaf.grad = None
        roi_ops.roi_pool(leaf, rois, 7, backend=b).backward(g)

    def inf():
        with torch.no_grad():
            roi_ops.roi_pool(x, rois, 7, backend=b)

    def fwd():
        roi_ops.roi_pool(leaf, rois, 7, backend=b)

    return {"infer": inf, "fwd": fwd, "fwd+bwd": fb}


def sample(fn, calls=200):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return dt


with value_checks(False):
    tri, cu = make("triton"), make("cupy")
    for mode in ("infer", "fwd", "fwd+bwd"):
        for fn in (tri[mode], cu[mode]):
            for _ in range(100):
                fn()
        slow, fast, ratio, cupy = [], [], [], []
        for _ in range(15):
            launcher.enabled = False
            a = sample(tri[mode])
            launcher.enabled = True
            b = sample(tri[mode])
            cupy.append(sample(cu[mode]))
            slow.append(a)
            fast.append(b)
            ratio.append(a / b)
        print(
            f"host {mode}: triton bound {statistics.median(slow):.1f} us, cached "
            f"{statistics.median(fast):.1f} us, median ratio {statistics.median(ratio):.2f}; "
            f"cupy {statistics.median(cupy):.1f} us",
            flush=True,
        )
