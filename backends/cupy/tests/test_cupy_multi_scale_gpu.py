"""The CuPy backend's fused multi-level path on a CUDA device (skipped without one):
`roi_ops.multi_scale_roi_pool` with backend="cupy" on the fpn-multi bench workload, bit for bit
against backend="torch" (forward, inference and backward), and a default call (forward and
backward) that never synchronises the device."""

from __future__ import annotations

import pytest
import roi_ops
import torch
from cupy_harness import GPU_ONLY
from roi_ops.bench.pyramid import FPN_MULTI, make_boxes, make_pyramid
from roi_ops.testing import assert_same_bits

pytestmark = GPU_ONLY


def _workload(dtype: torch.dtype, layout: str):
    """fpn-multi's levels (as leaves that require grad) and boxes on the GPU."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    features = [
        x.contiguous(memory_format=fmt).requires_grad_(True)
        for x in make_pyramid(FPN_MULTI, dtype, "cuda")
    ]
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    return features, make_boxes(FPN_MULTI, rois_dtype, "cuda")


def _pool(features, rois, **options):
    size, scales = FPN_MULTI.output_size, FPN_MULTI.spatial_scales
    return roi_ops.multi_scale_roi_pool(features, rois, size, scales, **options)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"]
)
def test_fpn_multi_bit_for_bit_with_the_torch_backend(cuda_backend, monkeypatch, dtype, layout):
    """fpn-multi (N=8, C=256, P2-P5 of 800 x 1088, 8000 boxes, 7 x 7): outputs, inference and
    gradients equal the torch backend's level-by-level loop; integer gradients make the atomic
    sums exact in any order."""
    from roi_ops_cupy.launch import DEFAULT_LAUNCHER

    calls = []
    for method in ("forward_multi_scale", "backward_multi_scale"):
        original = getattr(DEFAULT_LAUNCHER, method)
        counted = lambda *args, _m=method, _f=original: calls.append(_m) or _f(*args)  # noqa: E731
        monkeypatch.setattr(DEFAULT_LAUNCHER, method, counted)
    features, rois = _workload(dtype, layout)
    out = _pool(features, rois, backend="cupy")
    assert calls == ["forward_multi_scale"]
    expected = _pool(features, rois, backend="torch")
    assert_same_bits(out.detach().cpu(), expected.detach().cpu())
    with torch.no_grad():
        inference = _pool(features, rois, backend="cupy")
    assert_same_bits(inference.cpu(), expected.detach().cpu())
    g = torch.Generator().manual_seed(3)
    grad = torch.randint(-3, 4, out.shape, generator=g).to(dtype).cuda()
    grads = torch.autograd.grad(out, features, grad)
    assert calls == ["forward_multi_scale", "forward_multi_scale", "backward_multi_scale"]
    expected_grads = torch.autograd.grad(expected, features, grad)
    for level, (actual, wanted) in enumerate(zip(grads, expected_grads, strict=True)):
        assert actual.dtype == wanted.dtype and actual.stride() == wanted.stride(), level
        assert torch.equal(actual, wanted), f"level {level}"
    assert all(bool(g.ne(0).any()) for g in expected_grads)  # every level gets gradients


def test_a_default_fused_call_never_synchronises(cuda_backend):
    """backend="auto" picks cupy; with value checks on (the default) neither the forward nor the
    backward waits for the device."""
    from roi_ops_cupy.launch import DEFAULT_LAUNCHER

    features, rois = _workload(torch.float32, "contiguous")
    grad = torch.randn(rois.shape[0], features[0].shape[1], 7, 7, device="cuda")
    _pool(features, rois).backward(grad)  # compiles the kernels and fills the plan caches
    torch.cuda.synchronize()
    cached = len(DEFAULT_LAUNCHER._forward_levels), len(DEFAULT_LAUNCHER._backward_levels)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _pool(features, rois).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    # The fused plans served every call (nothing planned again, no level-by-level loop).
    assert (len(DEFAULT_LAUNCHER._forward_levels), len(DEFAULT_LAUNCHER._backward_levels)) == cached
    assert cached[0] >= 1 and cached[1] >= 1
    assert all(f.grad is not None and bool(f.grad.ne(0).any()) for f in features)
