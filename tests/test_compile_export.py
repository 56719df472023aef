"""torch.library opcheck, torch.compile and torch.export of roi_pool."""

from __future__ import annotations

import torch
from helpers import small_inputs

import roi_ops
from roi_ops.ops import roi_pool_backward_op, roi_pool_op


def test_opcheck():
    x, rois = small_inputs()
    torch.library.opcheck(roi_pool_op, (x.requires_grad_(True), rois, 3, 2, 0.5, "auto", True))
    torch.library.opcheck(roi_pool_op, (x.detach(), rois, 3, 2, 0.5, "auto", False))
    _, argmax = roi_ops.roi_pool_with_argmax(x, rois, (3, 2), 0.5)
    grad = torch.randn(argmax.shape, dtype=x.dtype, requires_grad=True)
    for needs_grad in (True, False):  # the op traced and scripted graphs hold
        leaf = x.detach().requires_grad_(needs_grad)
        torch.library.opcheck(
            torch.ops.roi_ops.roi_pool_jit.default, (leaf, rois, 3, 2, 0.5, "auto")
        )
    for channels_last in (False, True):  # the fake gradient's strides match the real one's
        torch.library.opcheck(
            roi_pool_backward_op,
            (grad, rois, argmax, 2, 3, 10, 12, torch.float64, "auto", channels_last),
        )


def test_compile_fullgraph_with_varying_roi_count():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    x, _ = small_inputs(torch.float32)
    compiled = torch.compile(
        lambda a, b: roi_ops.roi_pool(a, b, 3, 0.5, backend="torch") * 2, fullgraph=True
    )
    for k in (3, 5, 8, 13):
        _, rois = small_inputs(torch.float32, k=k, seed=k)
        leaf = x.clone().requires_grad_(True)
        out = compiled(leaf, rois)
        out.sum().backward()
        expected = roi_ops.roi_pool(x.clone().requires_grad_(True), rois, 3, 0.5) * 2
        assert torch.equal(out, expected)
        ref_leaf = x.clone().requires_grad_(True)
        (roi_ops.roi_pool(ref_leaf, rois, 3, 0.5) * 2).sum().backward()
        assert torch.equal(leaf.grad, ref_leaf.grad)
    # One static graph, then one dynamic in K: no recompilation per ROI count after that.
    assert counters["stats"]["unique_graphs"] <= 2


def test_compile_list_rois():
    x, rois = small_inputs(torch.float32)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    compiled = torch.compile(lambda a, b: roi_ops.roi_pool(a, b, 2), fullgraph=True)
    assert torch.equal(compiled(x, per_image), roi_ops.roi_pool(x, per_image, 2))


def test_export_with_dynamic_roi_count():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = roi_ops.RoIPool(3, 0.5)

        def forward(self, x, rois):
            return self.pool(x, rois).flatten(1).sum(1)

    x, rois = small_inputs(torch.float32)
    k = torch.export.Dim("K", min=1)
    exported = torch.export.export(Head(), (x, rois), dynamic_shapes=({}, {0: k}))
    assert "roi_ops.roi_pool" in str(exported.graph)
    for count in (2, 9):
        _, other = small_inputs(torch.float32, k=count, seed=count)
        assert torch.equal(exported.module()(x, other), Head()(x, other))


def test_compile_and_export_with_torchvision_style_arguments():
    x, rois = small_inputs(torch.float32)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    expected = roi_ops.roi_pool(x, per_image, (3, 2), 0.5)

    def pool(a, boxes):
        return roi_ops.roi_pool(a, boxes=boxes, output_size=(3, 2), spatial_scale=0.5)

    torch._dynamo.reset()
    compiled = torch.compile(pool, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, per_image), expected)

    class Head(torch.nn.Module):
        def forward(self, a, first, second):
            return pool(a, [first, second])

    exported = torch.export.export(Head(), (x, *per_image))
    assert torch.equal(exported.module()(x, *per_image), expected)
