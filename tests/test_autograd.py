"""The one autograd core: eager fast path and custom op give the same results, the backward runs
on the backend that ran the forward, double backward, deterministic mode, half gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import TorchKernels, deterministic_algorithms, small_inputs

import roi_ops
from roi_ops.autograd import plain_eager
from roi_ops.ops import roi_pool_op
from roi_ops.registry import REGISTRY
from roi_ops.testing import reference_roi_pool, reference_roi_pool_backward, registered_backend


def test_gradcheck_and_gradgradcheck_on_both_call_paths(call_path):
    x, rois = small_inputs()
    x.requires_grad_(True)
    assert plain_eager(x, rois)
    assert torch.autograd.gradcheck(lambda a: roi_ops.roi_pool(a, rois, (3, 2), 0.5), (x,))
    assert torch.autograd.gradgradcheck(lambda a: roi_ops.roi_pool(a, rois, (3, 2), 0.5), (x,))


def test_eager_fast_path_matches_the_custom_op(monkeypatch):
    import roi_ops.functional

    x, rois = small_inputs()
    results = {}
    for path in ("eager", "custom-op"):
        if path == "custom-op":
            monkeypatch.setattr(roi_ops.functional, "plain_eager", lambda *_: False)
        leaf = x.clone().requires_grad_(True)
        out = roi_ops.roi_pool(leaf, rois, (3, 2), 0.5)
        weight = torch.arange(out.numel(), dtype=x.dtype).reshape(out.shape).requires_grad_(True)
        (grad,) = torch.autograd.grad(out, leaf, weight, create_graph=True)
        (grad_grad,) = torch.autograd.grad(
            (grad * torch.arange(grad.numel()).view_as(grad)).sum(), weight
        )
        with torch.no_grad():
            inference = roi_ops.roi_pool(leaf, rois, (3, 2), 0.5)
        results[path] = (out.detach(), grad.detach(), grad_grad, inference)
    for fast, slow in zip(results["eager"], results["custom-op"], strict=True):
        assert torch.equal(fast, slow)


def test_eager_fast_path_steps_aside_for_tracing_and_transforms():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, rois = small_inputs()
    assert plain_eager(x, rois)
    with FakeTensorMode() as mode:
        fake_x, fake_rois = mode.from_tensor(x), mode.from_tensor(rois)
        assert not plain_eager(fake_x, fake_rois)
        assert roi_ops.roi_pool(fake_x, fake_rois, (3, 2), 0.5).shape == (rois.shape[0], 3, 3, 2)
    seen = []
    torch.vmap(lambda a: seen.append(plain_eager(a, rois)) or a)(x)
    assert seen == [False]
    # A pyramid: one tensor that is not plain among the levels turns the fast path off.
    levels = [x, x[:, :, ::2, ::2].contiguous()]
    assert plain_eager(rois, *levels)
    assert not plain_eager(rois, levels[0], torch.nn.Parameter(levels[1]))


def test_inference_does_not_record_autograd():
    x, rois = small_inputs()
    leaf = x.clone().requires_grad_(True)
    with torch.no_grad():
        out = roi_ops.roi_pool(leaf, rois, 2)
    assert out.grad_fn is None and not out.requires_grad
    assert roi_ops.roi_pool(x, rois, 2).grad_fn is None


def test_no_gradient_without_argmax():
    x, rois = small_inputs()
    rois = rois.clone().requires_grad_(True)  # only the (non-differentiable) boxes need grad
    out = roi_ops.roi_pool(x, rois, (3, 2), 0.5)
    assert not out.requires_grad


def test_op_without_argmax_refuses_backward():
    x, rois = small_inputs()
    x.requires_grad_(True)
    out, _ = roi_pool_op(x, rois, 2, 2, 1.0, "auto", False)
    with pytest.raises(RuntimeError, match="without an argmax"):
        out.sum().backward()


def test_inference_skips_argmax():
    x, rois = small_inputs()
    with torch.no_grad():
        output, argmax = roi_pool_op(x, rois, 2, 2, 1.0, "auto", False)
    assert argmax.numel() == 0 and output.shape == (6, 3, 2, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_accumulate_in_float32(dtype):
    # 300 overlapping ROIs push 300 gradients of 1/3 into one pixel: summing in half precision
    # would stall far from 100; accumulating in float32 and rounding once does not.
    x = torch.zeros(1, 1, 4, 4, dtype=dtype)
    x[0, 0, 1, 1] = 5
    x.requires_grad_(True)
    rois = torch.tensor([[0.0, 0, 0, 3, 3]] * 300, dtype=torch.float32)
    out = roi_ops.roi_pool(x, rois, 1, backend="torch")
    out.backward(torch.full_like(out, 1 / 3))
    expected = torch.tensor(300 * float(torch.tensor(1 / 3, dtype=dtype)), dtype=torch.float32)
    assert x.grad[0, 0, 1, 1] == expected.to(dtype)


def test_grad_output_with_zero_strides():
    x, rois = small_inputs()
    x.requires_grad_(True)
    out = roi_ops.roi_pool(x, rois, 2)
    out.backward(torch.tensor(2.0, dtype=x.dtype).expand_as(out))
    _, argmax = reference_roi_pool(x.detach(), rois, 2)
    assert x.grad.sum() == 2 * (argmax >= 0).sum()


def test_empty_rois_give_empty_output_and_zero_gradient():
    x, _ = small_inputs()
    x.requires_grad_(True)
    out = roi_ops.roi_pool(x, torch.empty(0, 5, dtype=x.dtype), 4)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# The backward runs on the forward's backend --------------------------------------------------


class Recording(TorchKernels):
    """float64 CPU backend (the torch backend's kernels) that records its calls."""

    priority = 1000
    deterministic_backward = True

    def __init__(self):
        self.calls = []

    def forward(self, problem, output, argmax):
        self.calls.append("forward")
        super().forward(problem, output, argmax)

    def backward(self, problem):
        from roi_ops.scatter import scatter_backward

        self.calls.append("backward")
        return scatter_backward(
            problem.grad_output,
            problem.argmax,
            problem.batch_index,
            problem.input_shape,
            problem.input_dtype,
        )


class First(Recording):
    name = "first"


class Second(Recording):
    name = "second"


@pytest.fixture
def two_backends():
    with registered_backend(First()) as first, registered_backend(Second()) as second:
        yield first, second


def _expected_gradient(x, rois, grad_output):
    _, argmax = reference_roi_pool(x, rois, 2)
    return reference_roi_pool_backward(grad_output, argmax, rois, tuple(x.shape))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-call", "torch.compile"])
def test_backward_after_a_use_backend_block_runs_on_the_forwards_backend(
    two_backends, call_path, compiled
):
    first, second = two_backends
    x, rois = small_inputs()
    leaf = x.clone().requires_grad_(True)
    pool = lambda a, b: roi_ops.roi_pool(a, b, 2)  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        pool = torch.compile(pool, fullgraph=True, backend="aot_eager")
    with roi_ops.use_backend("second"):
        out = pool(leaf, rois)
    grad_output = torch.randn(out.shape, dtype=out.dtype)
    out.backward(grad_output)  # "auto" would now choose "first"
    assert second.calls == ["forward", "backward"] and first.calls == []
    assert torch.equal(leaf.grad, _expected_gradient(x, rois, grad_output))


def test_backward_after_the_environment_changed_runs_on_the_forwards_backend(
    two_backends, call_path, monkeypatch
):
    first, second = two_backends
    x, rois = small_inputs()
    leaf = x.clone().requires_grad_(True)
    monkeypatch.setenv("ROI_OPS_BACKEND", "second")
    out = roi_ops.roi_pool(leaf, rois, 2)
    monkeypatch.setenv("ROI_OPS_BACKEND", "first")
    grad_output = torch.randn(out.shape, dtype=out.dtype)
    out.backward(grad_output)
    assert second.calls == ["forward", "backward"] and first.calls == []
    assert torch.equal(leaf.grad, _expected_gradient(x, rois, grad_output))


class Atomic(Recording):
    """Declares a non-deterministic backward."""

    name = "atomic"
    deterministic_backward = False


def _two_gradients(x, rois, backend):
    """The input gradients of two identical calls (3 x 3 bins) on `backend`."""
    grads = []
    for _ in range(2):
        leaf = x.clone().requires_grad_(True)
        out = roi_ops.roi_pool(leaf, rois, 3, backend=backend)
        out.backward(torch.linspace(-3, 3, out.numel(), dtype=out.dtype).view(out.shape))
        grads.append(leaf.grad)
    return grads


def test_deterministic_mode_replaces_a_nondeterministic_backward_with_the_shared_scatter():
    with registered_backend(Atomic()) as backend:
        x, rois = small_inputs(k=40)
        leaf = x.clone().requires_grad_(True)
        with deterministic_algorithms():
            grads = _two_gradients(x, rois, "atomic")
            explanation = roi_ops.explain(leaf, rois, 3, backend="atomic")
        assert backend.calls == ["forward", "forward"]  # its backward was not called
        assert torch.equal(grads[0], grads[1])
        assert "shared deterministic scatter" in explanation.backward
        out = roi_ops.roi_pool(leaf, rois, 3, backend="atomic")
        out.sum().backward()
        assert backend.calls[-1] == "backward"


def test_deterministic_mode_gives_identical_gradients():
    x, rois = small_inputs(torch.float32, k=40)
    with deterministic_algorithms():
        grads = _two_gradients(x, rois, "torch")
    assert torch.equal(grads[0], grads[1])


def test_backward_recorded_owner_survives_many_calls():
    x, rois = small_inputs()
    first = roi_ops.roi_pool(x.clone().requires_grad_(True), rois, 2)
    for _ in range(50):
        roi_ops.roi_pool(x.clone().requires_grad_(True), rois, 2)
    first.sum().backward()
    assert REGISTRY.get("torch") is not None
