"""torchvision's RoIPool test battery (its test/test_ops.py, TestRoiPool and RoIOpTester),
rewritten against roi_ops: forward against a Python reference, fx (leaf node and trace),
gradcheck with and without deterministic mode, TorchScript, autocast, box-shape errors, meta
tensors, and ONNX export next to torchvision's. Where roi_ops deliberately differs (box-shape
errors are ValueErrors naming the argument, not AssertionErrors), the test says so."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from tv_support import DEVICES, torchvision_pool

torchvision = pytest.importorskip("torchvision")
import roi_ops  # noqa: E402

ROIS = [[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]]


class DeterministicGuard:
    def __init__(self, deterministic: bool) -> None:
        self.deterministic = deterministic

    def __enter__(self) -> None:
        self.restore = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.deterministic)

    def __exit__(self, *exc_info: object) -> None:
        torch.use_deterministic_algorithms(self.restore)


class ModuleWrapper(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.n_inputs = 2

    def forward(self, a, b):
        self.layer(a, b)


class PoolWrapper(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, imgs: Tensor, boxes: list[Tensor]) -> Tensor:
        return self.pool(imgs, boxes)


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's TorchScript deprecation notices
        return function(*args, **kwargs)


def expected_roi_pool(x, rois, pool_h, pool_w, spatial_scale=1.0, dtype=torch.float64):
    """torchvision's Python reference (TestRoiPool.expected_fn), for integer box corners."""
    n_channels = x.size(1)
    y = torch.zeros(rois.size(0), n_channels, pool_h, pool_w, dtype=dtype, device=x.device)

    def get_slice(k, block):
        return slice(int(np.floor(k * block)), int(np.ceil((k + 1) * block)))

    for roi_idx, roi in enumerate(rois):
        batch_idx = int(roi[0])
        j_begin, i_begin, j_end, i_end = (int(round(v.item() * spatial_scale)) for v in roi[1:])
        roi_x = x[batch_idx, :, i_begin : i_end + 1, j_begin : j_end + 1]
        roi_h, roi_w = roi_x.shape[-2:]
        bin_h, bin_w = roi_h / pool_h, roi_w / pool_w
        for i in range(pool_h):
            for j in range(pool_w):
                bin_x = roi_x[:, get_slice(i, bin_h), get_slice(j, bin_w)]
                if bin_x.numel() > 0:
                    y[roi_idx, :, i, j] = bin_x.reshape(n_channels, -1).max(dim=1)[0]
    return y


def _forward(device, contiguous, x_dtype, rois_dtype=None):
    rois_dtype = x_dtype if rois_dtype is None else rois_dtype
    tol = 4e-3 if x_dtype is torch.half else 1e-5
    x = torch.rand(2, 50, 10, 10, dtype=x_dtype, device=device)
    if not contiguous:
        x = x.permute(0, 1, 3, 2)
    rois = torch.tensor(ROIS, dtype=rois_dtype, device=device)
    y = roi_ops.RoIPool((5, 5), 1)(x, rois)
    assert y.dtype == x.dtype  # with or without autocast
    expected = expected_roi_pool(x, rois, 5, 5, dtype=x_dtype)
    torch.testing.assert_close(expected.to(y), y, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("contiguous", (True, False))
@pytest.mark.parametrize("x_dtype", (torch.float16, torch.float32, torch.float64), ids=str)
def test_forward(device, contiguous, x_dtype):
    _forward(device, contiguous, x_dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_is_leaf_node(device):
    from torchvision.models.feature_extraction import get_graph_node_names

    wrapper = ModuleWrapper(roi_ops.RoIPool((5, 5), 1)).to(device)
    train_nodes, eval_nodes = get_graph_node_names(wrapper)
    assert len(train_nodes) == len(eval_nodes) == 1 + wrapper.n_inputs


@pytest.mark.parametrize("device", DEVICES)
def test_torch_fx_trace(device):
    pool = roi_ops.RoIPool((5, 5), 1).to(device)
    graph_module = torch.fx.symbolic_trace(pool)
    x = torch.rand(2, 50, 5, 5, device=device)
    rois = torch.tensor(ROIS, dtype=torch.float, device=device)
    expected = pool(x, rois)
    got = graph_module(x, rois)
    assert got.dtype == x.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("contiguous", (True, False))
@pytest.mark.parametrize("deterministic", (False, True))
def test_backward(seed, device, contiguous, deterministic):
    torch.random.manual_seed(seed)
    x = torch.rand(1, 8, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    if not contiguous:
        x = x.permute(0, 1, 3, 2)
    rois = torch.tensor(
        [[0, 0, 0, 4, 4], [0, 0, 2, 3, 4], [0, 2, 2, 4, 4]], dtype=torch.float64, device=device
    )
    pool = roi_ops.RoIPool((2, 2), 1)
    with DeterministicGuard(deterministic):
        assert torch.autograd.gradcheck(lambda z: pool(z, rois), (x,))
    scripted = _quiet(torch.jit.script, roi_ops.roi_pool)
    assert torch.autograd.gradcheck(lambda z: scripted(z, rois, 2), (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("x_dtype", (torch.float, torch.half))
@pytest.mark.parametrize("rois_dtype", (torch.float, torch.half))
def test_autocast(x_dtype, rois_dtype):
    with torch.autocast("cuda"):
        _forward(torch.device("cuda"), False, x_dtype, rois_dtype)


@pytest.mark.parametrize("x_dtype", (torch.float, torch.bfloat16))
@pytest.mark.parametrize("rois_dtype", (torch.float, torch.bfloat16))
def test_cpu_autocast(x_dtype, rois_dtype):
    # torchvision has no CPU autocast kernel for roi_pool; roi_ops accepts the same mixes.
    tol = 1e-2 if x_dtype is torch.bfloat16 else 1e-5
    x = torch.rand(2, 50, 10, 10).to(x_dtype)
    rois = torch.tensor(ROIS, dtype=rois_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = roi_ops.RoIPool((5, 5), 1)(x, rois)
    assert y.dtype == x.dtype
    torch.testing.assert_close(expected_roi_pool(x, rois, 5, 5).to(y), y, rtol=tol, atol=tol)


def test_boxes_shape():
    # torchvision raises AssertionError; roi_ops a ValueError naming the argument and the fix.
    a = torch.linspace(1, 8 * 8, 8 * 8).reshape(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"rois: expected a \(K, 5\) tensor"):
        roi_ops.roi_pool(a, torch.tensor([[0, 0, 3, 3]], dtype=a.dtype), output_size=(2, 2))
    with pytest.raises(ValueError, match=r"rois\[0\]: expected an \(L, 4\) tensor"):
        roi_ops.roi_pool(a, [torch.tensor([[0, 0, 3]], dtype=a.dtype)], output_size=(2, 2))
    with pytest.raises(AssertionError):
        torchvision.ops.roi_pool(a, torch.tensor([[0, 0, 3, 3]], dtype=a.dtype), (2, 2))


def test_jit_boxes_list():
    model = PoolWrapper(roi_ops.RoIPool(output_size=[3, 3], spatial_scale=1.0))
    x = torch.rand(2, 1, 10, 10)
    roi = torch.tensor(ROIS, dtype=torch.float).t()
    scripted = _quiet(torch.jit.script, model)
    y = scripted(x, [roi, roi])
    assert y.shape == (10, 1, 3, 3)
    assert torch.equal(y, torchvision.ops.roi_pool(x, [roi, roi], [3, 3], 1.0))


# Beyond torchvision's battery: meta, tracing and ONNX, side by side with torchvision --------


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32, torch.float64))
def test_meta_matches_torchvisions_meta_kernel(dtype):
    x = torch.empty(2, 4, 10, 12, dtype=dtype, device="meta")
    rois = torch.empty(7, 5, dtype=dtype, device="meta")
    expected, _ = torchvision_pool(x, rois, (3, 2), 0.5)
    for mode in ("on", "immediate", "off"):
        with roi_ops.value_checks(mode):
            got = roi_ops.roi_pool(x, rois, (3, 2), 0.5)
        assert (got.shape, got.dtype, got.device) == (expected.shape, expected.dtype, x.device)


@pytest.mark.parametrize("device", DEVICES)
def test_trace_matches_torchvision_and_trains(device):
    x = torch.rand(2, 6, 10, 10, device=device)
    rois = torch.tensor(ROIS, dtype=torch.float, device=device)
    with torch.no_grad():
        traced = _quiet(torch.jit.trace, lambda a, b: roi_ops.roi_pool(a, b, 3, 0.5), (x, rois))
    leaf = x.clone().requires_grad_(True)
    out = traced(leaf, rois)
    assert torch.equal(out, torchvision.ops.roi_pool(x, rois, 3, 0.5))
    out.sum().backward()
    tv_leaf = x.clone().requires_grad_(True)
    torchvision.ops.roi_pool(tv_leaf, rois, 3, 0.5).sum().backward()
    assert torch.equal(leaf.grad, tv_leaf.grad)


def test_onnx_export_matches_torchvisions():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    class Head(nn.Module):
        def __init__(self, pool):
            super().__init__()
            self.pool = pool

        def forward(self, x, rois):
            return self.pool(x, rois)

    x = torch.randn(2, 6, 12, 14)
    rois = torch.tensor(ROIS, dtype=torch.float) * 1.3
    results = []
    for pool in (torchvision.ops.RoIPool((3, 2), 0.5), roi_ops.RoIPool((3, 2), 0.5)):
        buffer = io.BytesIO()
        _quiet(torch.onnx.export, Head(pool), (x, rois), buffer, dynamo=False)
        session = ort.InferenceSession(buffer.getvalue())
        names = [i.name for i in session.get_inputs()]
        feeds = dict(zip(names, (x.numpy(), rois.numpy()), strict=True))
        results.append(torch.from_numpy(session.run(None, feeds)[0]))
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[1], roi_ops.roi_pool(x, rois, (3, 2), 0.5))
