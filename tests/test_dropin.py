"""roi_ops where torchvision.ops.roi_pool worked: ``boxes=``, torch.fx, TorchScript (script and
trace), meta tensors, and patch_torchvision without torchvision. Autocast is in test_autocast.py,
ONNX in test_onnx.py, and the comparisons with torchvision itself in tests/torchvision_oracle/."""

from __future__ import annotations

import io
import sys
import warnings

import pytest
import torch
from helpers import small_inputs

import roi_ops
from roi_ops.testing import reference_roi_pool, reference_roi_pool_backward


def _per_image(rois: torch.Tensor) -> list[torch.Tensor]:
    return [rois[rois[:, 0] == i, 1:] for i in range(2)]


def _expected_gradient(x, rois, output_size, scale, grad_output):
    _, argmax = reference_roi_pool(x.detach(), rois, output_size, scale)
    return reference_roi_pool_backward(grad_output, argmax, rois, tuple(x.shape))


# boxes= --------------------------------------------------------------------------------------


def test_boxes_keyword_is_rois():
    x, rois = small_inputs()
    expected, _ = reference_roi_pool(x, rois, (3, 2), 0.5)
    calls = [
        roi_ops.roi_pool(x, boxes=rois, output_size=(3, 2), spatial_scale=0.5),
        roi_ops.roi_pool(x, rois=rois, output_size=(3, 2), spatial_scale=0.5),
        roi_ops.roi_pool(x, rois, (3, 2), 0.5),
        roi_ops.roi_pool(input=x, boxes=_per_image(rois), output_size=(3, 2), spatial_scale=0.5),
    ]
    order = torch.cat([torch.nonzero(rois[:, 0] == i)[:, 0] for i in range(2)])
    for i, got in enumerate(calls):
        assert torch.equal(got, expected[order] if i == 3 else expected)


def test_boxes_keyword_with_gradient(call_path):
    x, rois = small_inputs()
    leaf = x.clone().requires_grad_(True)
    out = roi_ops.roi_pool(leaf, boxes=rois, output_size=2)
    grad_output = torch.randn(out.shape, dtype=out.dtype)
    out.backward(grad_output)
    assert torch.equal(leaf.grad, _expected_gradient(x, rois, 2, 1.0, grad_output))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x, r: roi_ops.roi_pool(x, r, 2, boxes=r), "got both rois and boxes="),
        (lambda x, r: roi_ops.roi_pool(x, [r[:, 1:]], 2, boxes=r), "got both rois and boxes="),
        (lambda x, r: roi_ops.roi_pool(x, output_size=2), "missing the boxes; pass rois"),
        (lambda x, r: roi_ops.roi_pool(x, boxes=r), "missing required argument output_size"),
        (lambda x, r: roi_ops.roi_pool(x, r), "missing required argument output_size"),
        (lambda x, r: roi_ops.roi_pool(x, boxes=r.float(), output_size=2), "rois: expected dtype"),
    ],
)
def test_boxes_keyword_errors(call, message):
    x, rois = small_inputs()
    with pytest.raises(TypeError, match=message):
        call(x, rois)


# torch.fx -------------------------------------------------------------------------------------


class FxHead(torch.nn.Module):
    """A RoIPool module, a direct roi_ops.roi_pool call (with boxes=), and a backend argument."""

    def __init__(self):
        super().__init__()
        self.pool = roi_ops.RoIPool((3, 2), 0.5)

    def forward(self, x, rois, boxes: list[torch.Tensor]):
        direct = roi_ops.roi_pool(x, boxes=boxes, output_size=(3, 2), spatial_scale=0.5)
        named = roi_ops.roi_pool(x, rois, 2, backend="torch")
        return self.pool(x, rois), direct, named


def test_fx_symbolic_trace_records_roi_pool_as_one_node():
    x, rois = small_inputs()
    head = FxHead()
    traced = torch.fx.symbolic_trace(head)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets.count(roi_ops.roi_pool) == 3
    assert all(n.op != "call_module" for n in traced.graph.nodes)
    for other_rois in (rois, small_inputs(k=9, seed=3)[1]):
        got, expected = (
            traced(x, other_rois, _per_image(other_rois)),
            head(x, other_rois, _per_image(other_rois)),
        )
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def test_fx_graph_module_trains_and_scripts():
    x, rois = small_inputs()
    traced = torch.fx.symbolic_trace(roi_ops.RoIPool(3, 0.5))
    leaf = x.clone().requires_grad_(True)
    out = traced(leaf, rois)
    grad_output = torch.randn(out.shape, dtype=out.dtype)
    out.backward(grad_output)
    assert torch.equal(leaf.grad, _expected_gradient(x, rois, 3, 0.5, grad_output))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own TorchScript deprecation notices
        scripted = torch.jit.script(traced)
    assert torch.equal(scripted(x, rois), reference_roi_pool(x, rois, 3, 0.5)[0])


# TorchScript: script --------------------------------------------------------------------------


def _script(obj):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(obj)


def test_script_roi_pool_function_matches_eager():
    x, rois = small_inputs()
    scripted = _script(roi_ops.roi_pool)
    expected = roi_ops.roi_pool(x, rois, (3, 2), 0.5)
    assert torch.equal(scripted(x, rois, (3, 2), 0.5), expected)
    assert torch.equal(scripted(x, boxes=rois, output_size=[3, 2], spatial_scale=0.5), expected)
    single = scripted(x, rois, 3)
    assert torch.equal(single, reference_roi_pool(x, rois, 3)[0])


class ScriptedUser(torch.nn.Module):
    """Code written for torchvision: a module holding a RoIPool and a function-style call."""

    def __init__(self):
        super().__init__()
        self.pool = roi_ops.RoIPool(output_size=[3, 2], spatial_scale=0.5)

    def forward(self, x: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        a = self.pool(x, boxes)
        b = roi_ops.roi_pool(x, boxes=boxes, output_size=(3, 2), spatial_scale=0.5)
        return a + b


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_script_module_with_list_boxes_trains_and_survives_save_and_load(device):
    x, rois = (t.to(device) for t in small_inputs())
    boxes = _per_image(rois)
    table = torch.cat(
        [
            torch.cat([torch.full((len(b), 1), float(i), device=device), b], 1)
            for i, b in enumerate(boxes)
        ]
    )
    scripted = _script(ScriptedUser())
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for model in (scripted, loaded):
        leaf = x.clone().requires_grad_(True)
        out = model(leaf, boxes)
        expected = 2 * reference_roi_pool(x.cpu(), table.cpu(), (3, 2), 0.5)[0]
        assert torch.equal(out.detach().cpu(), expected)
        grad_output = torch.randn(out.shape, dtype=out.dtype)
        out.backward(grad_output.to(device))
        expected = _expected_gradient(x.cpu(), table.cpu(), (3, 2), 0.5, 2 * grad_output)
        torch.testing.assert_close(leaf.grad.cpu(), expected, rtol=0, atol=1e-12)


def test_scripted_call_decides_the_argmax_at_run_time():
    x, rois = small_inputs()
    scripted = _script(roi_ops.roi_pool)
    with torch.no_grad():
        out = scripted(x.clone().requires_grad_(True), rois, 2)
    assert out.grad_fn is None
    assert torch.autograd.gradcheck(lambda a: scripted(a, rois, 2), (x.clone().requires_grad_(),))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda f, x, r: f(x, r[:, :4], 2), r"rois: expected a \(K, 5\) tensor"),
        (lambda f, x, r: f(x, [r], 2), r"rois\[0\]: expected an \(L, 4\) tensor"),
        (lambda f, x, r: f(x[0], r, 2), r"input: expected a 4-D tensor"),
        (lambda f, x, r: f(x, r.float(), 2), r"rois: expected dtype"),
        (lambda f, x, r: f(x, r, 0), r"output_size: expected each size >= 1"),
        (lambda f, x, r: f(x, r, 2, 0.0), r"spatial_scale: expected a finite number > 0"),
        (lambda f, x, r: f(x, r, 2, float("inf")), r"spatial_scale: expected a finite number"),
        (lambda f, x, r: f(x, output_size=2), r"missing the boxes"),
        (lambda f, x, r: f(x, r, 2, boxes=r), r"got both rois and boxes="),
        (lambda f, x, r: f(x, r, 2, backend="nope"), r"unknown backend 'nope'"),
    ],
)
def test_script_errors_name_the_argument(call, message):
    x, rois = small_inputs()
    scripted = _script(roi_ops.roi_pool)
    with pytest.raises(Exception, match=message):
        call(scripted, x, rois)


def test_script_value_checks_still_apply():
    x, rois = small_inputs()
    rois[1, 0] = 7
    scripted = _script(roi_ops.roi_pool)
    with pytest.raises(Exception, match="batch index 7 outside"):
        scripted(x, rois, 2)


# TorchScript: trace ---------------------------------------------------------------------------


class TraceHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1).double()

    def forward(self, x, rois):
        return roi_ops.roi_pool(self.conv(x), rois, (3, 2), 0.5)


def _trace(model, args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # outputs that did not match
        # The argument checks read sizes, which tracing turns into tensors (torchvision's
        # roi_pool warns the same way); the pooled sizes are traced (see the list test).
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.trace(model, args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_trace_taken_without_grad_trains(device):
    x, rois = (t.to(device) for t in small_inputs())
    model = TraceHead().to(device)
    with torch.no_grad():
        traced = _trace(model, (x, rois))
    other = small_inputs(k=9, seed=5)[1].to(device)
    out = traced(x, other)
    reference = model(x, other)
    assert torch.equal(out, reference)
    out.sum().backward()
    got = model.conv.weight.grad.clone()
    model.zero_grad()
    reference.sum().backward()
    assert torch.equal(got, model.conv.weight.grad)


def test_trace_taken_with_grad_runs_without_argmax_under_no_grad():
    x, rois = small_inputs()
    model = TraceHead()
    traced = _trace(model, (x, rois))
    with torch.no_grad():
        out = traced(x, rois)
        assert out.grad_fn is None and torch.equal(out, model(x, rois))


def test_trace_with_list_boxes_follows_the_box_counts():
    x, rois = small_inputs()

    def pool(x, first, second):
        return roi_ops.roi_pool(x, [first, second], 2)

    traced = _trace(pool, (x, *_per_image(rois)))
    _, other = small_inputs(k=11, seed=4)
    boxes = _per_image(other)
    assert torch.equal(traced(x, *boxes), roi_ops.roi_pool(x, boxes, 2))


# meta tensors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["on", "immediate", "off"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_meta_tensors_give_shapes_under_every_value_check_mode(mode, dtype, call_path):
    x, rois = small_inputs(dtype)
    rois[0, 0] = 9  # a bad row: its values are unknown on meta, so nothing can be raised
    meta_x = x.to("meta").requires_grad_(True)
    meta_rois = rois.to("meta")
    with roi_ops.value_checks(mode):
        out = roi_ops.roi_pool(meta_x, meta_rois, (3, 2), 0.5)
        assert (out.shape, out.dtype, out.device.type) == ((6, 3, 3, 2), dtype, "meta")
        out.sum().backward()
        assert (meta_x.grad.shape, meta_x.grad.dtype) == (x.shape, dtype)
        boxes = [b.to("meta") for b in _per_image(rois)]
        listed = roi_ops.roi_pool(meta_x.detach(), boxes=boxes, output_size=4)
        assert listed.shape == (sum(len(b) for b in boxes), 3, 4, 4)
        output, argmax = roi_ops.roi_pool_with_argmax(meta_x, meta_rois, 2)
        assert output.shape == argmax.shape == (6, 3, 2, 2) and argmax.dtype == torch.int32


def test_meta_module_and_compile():
    x, rois = small_inputs(torch.float32)
    pool = roi_ops.RoIPool(7, 1 / 16).to("meta")
    assert pool(x.to("meta"), rois.to("meta")).shape == (6, 3, 7, 7)
    compiled = torch.compile(lambda a, b: roi_ops.roi_pool(a, b, 2), backend="eager")
    assert compiled(x.to("meta"), rois.to("meta")).shape == (6, 3, 2, 2)


# patch_torchvision without torchvision ---------------------------------------------------------


def test_patch_torchvision_without_torchvision_says_what_to_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.delitem(sys.modules, "torchvision.ops", raising=False)
    monkeypatch.delitem(sys.modules, "torchvision.ops.roi_pool", raising=False)
    with pytest.raises(ImportError, match="torchvision is not installed.*roi_ops.roi_pool"):
        roi_ops.patch_torchvision()
    assert not roi_ops.torchvision_patched()
    roi_ops.unpatch_torchvision()  # nothing active: nothing to do
