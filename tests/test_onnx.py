"""ONNX export through MaxRoiPool, run by onnxruntime on the CPU."""

from __future__ import annotations

import pytest
import torch

import roi_ops

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import roi_ops.onnx  # noqa: E402


class DetectionHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = roi_ops.RoIPool((3, 2), spatial_scale=0.5)
        self.fc = torch.nn.Linear(4 * 3 * 2, 5)

    def forward(self, features, rois):
        return self.fc(self.pool(features, rois).flatten(1))


def _rois(k, seed):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(k, 4, generator=g) * 24 - 2
    boxes[:, 2:] += boxes[:, :2].abs()
    batch = torch.randint(0, 2, (k, 1), generator=g).float()
    return torch.cat([batch, boxes], dim=1)


def _run(program, features, rois):
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(
        session.run(None, dict(zip(names, [features.numpy(), rois.numpy()], strict=True)))[0]
    )


def test_exported_head_matches_roi_ops_with_varying_roi_counts():
    torch.manual_seed(0)
    model = DetectionHead().eval()
    features = torch.randn(2, 4, 12, 14)
    program = roi_ops.onnx.export(
        model, (features, _rois(5, 0)), dynamic_shapes=({}, {0: torch.export.Dim("K")})
    )
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert "MaxRoiPool" in ops
    for k, seed in ((5, 1), (9, 2), (1, 3)):
        rois = _rois(k, seed)
        with torch.no_grad():
            expected = model(features, rois)
        torch.testing.assert_close(_run(program, features, rois), expected, rtol=1e-6, atol=1e-6)


def test_pooled_values_are_identical_on_finite_inputs():
    class Pool(torch.nn.Module):
        def forward(self, x, rois):
            return roi_ops.roi_pool(x, rois, 3, 0.5)

    features = torch.randn(2, 3, 10, 12).round()  # ties
    rois = _rois(7, 4)
    program = roi_ops.onnx.export(Pool(), (features, rois))
    assert torch.equal(_run(program, features, rois), Pool()(features, rois))


def test_documented_differences_nan_and_negative_infinity():
    class Pool(torch.nn.Module):
        def forward(self, x, rois):
            return roi_ops.roi_pool(x, rois, 2)

    features = torch.randn(1, 2, 6, 6)
    features[0, 0, :3, :3] = float("-inf")
    features[0, 1, 0, 0] = float("nan")
    rois = torch.tensor([[0.0, 0, 0, 5, 5]])
    got = _run(roi_ops.onnx.export(Pool(), (features, rois)), features, rois)
    expected = Pool()(features, rois)
    assert expected[0, 0, 0, 0] == float("-inf") and got[0, 0, 0, 0] == -torch.finfo().max
    assert expected[0, 1, 0, 0].isnan() and not got[0, 1, 0, 0].isnan()
    same = torch.ones_like(got, dtype=torch.bool)
    same[0, :, 0, 0] = False
    assert torch.equal(got[same], expected[same])


def test_non_float32_export_is_a_clear_error():
    class Pool(torch.nn.Module):
        def forward(self, x, rois):
            return roi_ops.roi_pool(x, rois, 2)

    features = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(roi_ops.onnx.RoiPoolExportError, match="input: ONNX MaxRoiPool needs"):
        roi_ops.onnx.export(Pool(), (features, torch.tensor([[0.0, 0, 0, 5, 5]]).double()))
