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


# torch.onnx.export itself, both exporters, with no roi_ops arguments ---------------------------


def _session_run(model_bytes, *inputs):
    session = ort.InferenceSession(model_bytes)
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, [t.numpy() for t in inputs], strict=True))
    return torch.from_numpy(session.run(None, feeds)[0])


class PoolOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = roi_ops.RoIPool((3, 2), spatial_scale=0.5)

    def forward(self, features, rois):
        return self.pool(features, rois)


def _torchscript_export(model, args, **kwargs) -> bytes:
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, args, buffer, dynamo=False, **kwargs)
    return buffer.getvalue()


def test_torchscript_exporter_matches_onnxruntime_with_varying_roi_counts():
    features = torch.randn(2, 4, 12, 14).round()  # ties
    model = PoolOnly()
    blob = _torchscript_export(
        model,
        (features, _rois(5, 0)),
        input_names=["features", "rois"],
        dynamic_axes={"rois": {0: "K"}},
    )
    import onnx

    assert "MaxRoiPool" in {node.op_type for node in onnx.load_from_string(blob).graph.node}
    for k, seed in ((5, 1), (9, 2), (1, 3)):
        rois = _rois(k, seed)
        assert torch.equal(_session_run(blob, features, rois), model(features, rois))


def test_torchscript_exporter_with_list_boxes_and_a_trainable_model():
    class Head(torch.nn.Module):  # parameters that require grad: the argmax is not exported
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 1)

        def forward(self, features, first, second):
            pooled = roi_ops.roi_pool(self.conv(features), boxes=[first, second], output_size=2)
            return pooled.flatten(1)

    torch.manual_seed(1)
    model, features = Head(), torch.randn(2, 4, 12, 14)
    rois = _rois(6, 5)
    first, second = rois[rois[:, 0] == 0, 1:], rois[rois[:, 0] == 1, 1:]
    blob = _torchscript_export(model, (features, first, second))
    with torch.no_grad():
        expected = model(features, first, second)
    torch.testing.assert_close(_session_run(blob, features, first, second), expected)


def test_torchscript_exporter_refuses_other_dtypes_clearly():
    features = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(Exception, match="input: ONNX MaxRoiPool needs float32"):
        _torchscript_export(PoolOnly(), (features, torch.tensor([[0.0, 0, 0, 5, 5]]).double()))


def test_dynamo_exporter_needs_no_translation_table():
    features = torch.randn(2, 4, 12, 14).round()
    model = PoolOnly()
    program = torch.onnx.export(
        model, (features, _rois(5, 0)), dynamo=True, dynamic_shapes=({}, {0: torch.export.Dim("K")})
    )
    for k, seed in ((5, 1), (8, 2)):
        rois = _rois(k, seed)
        blob = program.model_proto.SerializeToString()
        assert torch.equal(_session_run(blob, features, rois), model(features, rois))


def test_dynamo_exporter_with_parameters_that_require_grad():
    torch.manual_seed(2)
    model = DetectionHead()  # trains: the graph asks for an argmax, which ONNX does not need
    features, rois = torch.randn(2, 4, 12, 14), _rois(6, 7)
    program = torch.onnx.export(model, (features, rois), dynamo=True)
    with torch.no_grad():
        expected = model(features, rois)
    blob = program.model_proto.SerializeToString()
    torch.testing.assert_close(_session_run(blob, features, rois), expected, rtol=1e-6, atol=1e-6)


def test_register_reports_both_exporters():
    assert roi_ops.onnx.register() == {"torchscript": True, "dynamo": True}


_FRESH_PROCESS = """
import io, sys, warnings
import onnx, torch, roi_ops
warnings.simplefilter("ignore")
model = roi_ops.RoIPool(2, 0.5)
features, rois = torch.randn(1, 3, 8, 8), torch.tensor([[0.0, 1, 1, 9, 9]])
assert "roi_ops.onnx" not in sys.modules
if sys.argv[1] == "dynamo":
    proto = torch.onnx.export(model, (features, rois), dynamo=True).model_proto
elif sys.argv[1] == "traced-module":  # traced first, exported later: what torchvision allows
    with torch.no_grad():
        traced = torch.jit.trace(model, (features, rois))
    buffer = io.BytesIO()
    torch.onnx.export(traced, (features, rois), buffer, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
else:
    buffer = io.BytesIO()
    torch.onnx.export(model, (features, rois), buffer, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
print(sorted({node.op_type for node in proto.graph.node}))
"""


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript", "traced-module"])
def test_a_fresh_process_exports_without_importing_roi_ops_onnx(exporter):
    import os
    import subprocess
    import sys

    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, exporter],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MaxRoiPool" in done.stdout.splitlines()[-1]
