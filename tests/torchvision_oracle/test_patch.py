"""roi_ops.patch_torchvision(): code written against torchvision (Fast R-CNN-style heads, a
detection library that imported RoIPool by name) pools through roi_ops without edits, gives
torchvision's results on finite inputs, and is restored by undo()."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
from helpers import TorchKernels
from torch import nn
from tv_support import DEVICES

torchvision = pytest.importorskip("torchvision")
import roi_ops  # noqa: E402
from roi_ops.testing import registered_backend  # noqa: E402

TV_ROI_POOL = torchvision.ops.roi_pool
TV_ROIPOOL = torchvision.ops.RoIPool


class FastRCNNHead(nn.Module):
    """A Fast R-CNN box head as torchvision users write it: RoIPool, then two fc layers."""

    def __init__(self, channels: int = 8, pooled: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.pool = torchvision.ops.RoIPool(pooled, spatial_scale=0.5)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * pooled * pooled, 6))

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.pool(self.backbone(images), boxes))


class FunctionalHead(nn.Module):
    """Calls torchvision.ops.roi_pool at run time, with torchvision's keyword names."""

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return torchvision.ops.roi_pool(features, boxes=rois, output_size=(3, 2), spatial_scale=1)


LIBRARY_SOURCE = """
from torchvision.ops import RoIPool, roi_pool

class Pooler:
    def __init__(self):
        self.level = RoIPool((2, 2), spatial_scale=0.25)

    def __call__(self, features, rois):
        return self.level(features, rois), roi_pool(features, rois, 2, 0.25)
"""


@pytest.fixture
def library():
    """A detectron2/mmdet-style module that bound torchvision's names at import time."""
    module = types.ModuleType("fake_detection_library")
    exec(compile(LIBRARY_SOURCE, "fake_detection_library.py", "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


@pytest.fixture(autouse=True)
def no_patch_left_behind():
    yield
    roi_ops.unpatch_torchvision()
    assert torchvision.ops.roi_pool is TV_ROI_POOL and torchvision.ops.RoIPool is TV_ROIPOOL


class Counting(TorchKernels):
    """A CPU backend (the torch backend's kernels) that counts its forwards."""

    name = "counting"
    dtypes = frozenset({torch.float32, torch.float64})
    priority = 10_000

    def __init__(self) -> None:
        self.forwards = 0

    def forward(self, problem, output, argmax):
        self.forwards += 1
        super().forward(problem, output, argmax)


@pytest.fixture
def counting():
    with registered_backend(Counting()) as backend:
        yield backend


def _inputs(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 24, 28, generator=g).to(device)
    boxes = []
    for count in (5, 3):
        xy = torch.rand(count, 2, generator=g) * 20
        wh = torch.rand(count, 2, generator=g) * 20 + 1
        boxes.append(torch.cat([xy, xy + wh], dim=1).to(device))
    rois = torch.cat(
        [
            torch.cat([torch.full((len(b), 1), float(i), device=device), b], 1)
            for i, b in enumerate(boxes)
        ]
    )
    return images, boxes, rois


def test_patch_routes_torchvision_through_roi_ops(counting, library):
    torch.manual_seed(0)
    head, functional, pooler = FastRCNNHead(), FunctionalHead(), library.Pooler()
    images, boxes, rois = _inputs()
    features = head.backbone(images).detach()
    before = head(images, boxes), functional(features, rois), pooler(features, rois)
    assert counting.forwards == 0
    with roi_ops.patch_torchvision() as patch:
        assert patch.active and roi_ops.torchvision_patched()
        assert torchvision.ops.roi_pool is roi_ops.roi_pool
        assert torchvision.ops.RoIPool is roi_ops.RoIPool
        assert library.roi_pool is roi_ops.roi_pool and library.RoIPool is roi_ops.RoIPool
        assert {"torchvision.ops.roi_pool", "torchvision.ops.RoIPool"} <= set(patch.bindings)
        during = head(images, boxes), functional(features, rois), pooler(features, rois)
        assert counting.forwards == 4  # the head built before the patch pools through roi_ops
        fresh = library.Pooler()  # built while patched: a roi_ops.RoIPool
        assert isinstance(fresh.level, roi_ops.RoIPool)
    assert not patch.active and torchvision.ops.roi_pool is TV_ROI_POOL
    assert library.RoIPool is TV_ROIPOOL
    torch.testing.assert_close(during[0], before[0], rtol=0, atol=0)
    assert torch.equal(during[1], before[1])
    assert all(torch.equal(a, b) for a, b in zip(during[2], before[2], strict=True))
    head(images, boxes)
    assert counting.forwards == 4  # undone: torchvision again


@pytest.mark.parametrize("device", DEVICES)
def test_patched_head_trains_like_torchvision(device):
    torch.manual_seed(0)
    head = FastRCNNHead().to(device)
    images, boxes, _ = _inputs(device, seed=1)
    grads = []
    for patched in (False, True):
        head.zero_grad()
        patch = roi_ops.patch_torchvision() if patched else None
        head(images, boxes).square().sum().backward()
        grads.append([p.grad.clone() for p in head.parameters()])
        if patch is not None:
            patch.undo()
    for theirs, ours in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_patched_code_traces_scripts_and_fx_traces():
    torch.manual_seed(0)
    head = FastRCNNHead()
    images, boxes, rois = _inputs()
    expected = head(images, boxes)
    with roi_ops.patch_torchvision(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(FastRCNNHead().eval())
        scripted.load_state_dict(head.state_dict())
        graph = torch.fx.symbolic_trace(head)
        traced = torch.jit.trace(FunctionalHead(), (images[:, :1], rois))
    assert "roi_ops" in str(scripted.inlined_graph)
    torch.testing.assert_close(scripted(images, boxes), expected, rtol=0, atol=0)
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert roi_ops.roi_pool in targets and torch.equal(graph(images, boxes), expected)
    assert torch.equal(traced(images[:, :1], rois), FunctionalHead()(images[:, :1], rois))


def test_nested_and_repeated_patches():
    outer = roi_ops.patch_torchvision()
    inner = roi_ops.patch_torchvision()
    assert outer.active and not inner.active and inner.bindings == []
    inner.undo()
    assert torchvision.ops.roi_pool is roi_ops.roi_pool  # the outer patch stands
    roi_ops.unpatch_torchvision()
    assert torchvision.ops.roi_pool is TV_ROI_POOL and not outer.active
    outer.undo()  # twice: nothing to do
    assert not roi_ops.torchvision_patched()


def test_undo_leaves_a_name_rebound_since_alone(library):
    patch = roi_ops.patch_torchvision()
    library.roi_pool = len  # someone else's change after the patch
    patch.undo()
    assert library.roi_pool is len and library.RoIPool is TV_ROIPOOL


def test_feature_extraction_node_names():
    # torchvision's feature extraction treats the classes in torchvision.ops as leaf modules.
    from torchvision.models.feature_extraction import get_graph_node_names

    head = FastRCNNHead()
    assert "pool" in get_graph_node_names(head)[0]
    head.pool = roi_ops.RoIPool(4, 0.5)
    assert "pool.roi_pool" in get_graph_node_names(head)[0]  # traced into: the documented name
    leaf = {"leaf_modules": [roi_ops.RoIPool]}
    assert "pool" in get_graph_node_names(head, tracer_kwargs=leaf)[0]
    with roi_ops.patch_torchvision():
        assert "pool" in get_graph_node_names(head)[0]
