"""The numba backward (`backward(problem)`) against the reference scatter; serial and parallel."""

from __future__ import annotations

import math

import pytest
import torch
from numba_cases import DTYPES, make_backend, random_features, random_rois, run_forward
from roi_ops.backend import RoIPoolBackwardProblem
from roi_ops.testing.reference import reference_roi_pool_backward

pytest.importorskip("numba")


def _backward_inputs(dtype, g):
    x = random_features((2, 3, 7, 8), dtype, g, ties=True)
    rois = random_rois(9, 2, 7, 8, 1.0, g).to(dtype)
    return x, rois


def _backward(backend, grad_output, argmax, rois, x):
    problem = RoIPoolBackwardProblem(grad_output, argmax, rois, tuple(x.shape), x.dtype)
    return backend.backward(problem)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(31)
    x, rois = _backward_inputs(dtype, g)
    _, argmax = run_forward(backend, x, rois, (3, 3), 1.0)
    grad_output = torch.randn(argmax.shape, generator=g, dtype=torch.float64).to(dtype)
    grad = _backward(backend, grad_output, argmax, rois, x)
    assert grad.dtype == dtype and grad.shape == x.shape and grad.is_contiguous()
    expected = reference_roi_pool_backward(grad_output, argmax, rois, x.shape)
    # One rounding of the float64 sum (float32 accumulation for 16-bit, so allow a few ulps).
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(grad.to(torch.float64), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("rois_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backward_reads_batch_from_rois(backend, rois_dtype):
    """Batch indices come from ``trunc(rois[:, 0])`` in the kernel (16-bit rows included); rows
    with a bad batch index or a non-finite value add nothing."""
    g = torch.Generator().manual_seed(37)
    x = random_features((3, 4, 6, 7), torch.float32, g, ties=True)
    rois = random_rois(12, 3, 6, 7, 1.0, g)
    rois[0, 0], rois[1, 0], rois[2, 0] = 2.9, -0.5, 1.0  # trunc: 2, 0 and 1
    rois[3, 0], rois[4, 0], rois[5, 0] = 3.0, -1.0, math.nan  # invalid batch indices
    rois[6, 2] = math.inf  # invalid: a non-finite coordinate
    rois = rois.to(rois_dtype)
    x = x.to(torch.float16) if rois_dtype != torch.float32 else x
    _, argmax = run_forward(backend, x, rois, (2, 3), 1.0)
    grad_output = torch.randn(argmax.shape, generator=g).to(x.dtype)
    grad = _backward(backend, grad_output, argmax, rois, x)
    expected = reference_roi_pool_backward(grad_output, argmax, rois, x.shape)
    torch.testing.assert_close(grad.to(torch.float64), expected, rtol=1e-2, atol=1e-2)
    fp32 = _backward(make_backend("serial"), grad_output.float(), argmax, rois.float(), x.float())
    assert torch.equal(grad, fp32.to(grad.dtype))  # float32 sums, rounded once


def test_backward_accumulates_half_in_float32(backend):
    """2048 + 1 + 1 in float16 stays 2048 step by step; accumulated in float32 it is 2050."""
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float16)
    argmax = torch.zeros(3, 1, 1, 1, dtype=torch.int32)
    grad_output = torch.tensor([2048.0, 1.0, 1.0], dtype=torch.float16).view(3, 1, 1, 1)
    rois = torch.zeros(3, 5, dtype=torch.float16)
    assert _backward(backend, grad_output, argmax, rois, x).item() == 2050.0


def test_backward_zero_strides_and_determinism(backend):
    g = torch.Generator().manual_seed(37)
    x, rois = _backward_inputs(torch.float32, g)
    _, argmax = run_forward(backend, x, rois, (4, 4), 1.0)
    grad_output = torch.tensor(0.1).expand(argmax.shape)  # all strides zero
    first = _backward(backend, grad_output, argmax, rois, x)
    for _ in range(3):
        again = _backward(backend, grad_output, argmax, rois, x)
        assert torch.equal(first.view(torch.int32), again.view(torch.int32))
    expected = reference_roi_pool_backward(grad_output, argmax, rois, x.shape)
    torch.testing.assert_close(first.to(torch.float64), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_bytes", [1, 2**30], ids=["one-channel", "all-channels"])
def test_backward_block_and_schedule_do_not_change_results(backend, block_bytes):
    """Backward tasks own (image, channel block)s; every block size, thread count and the
    serial kernel sum in the same order."""
    g = torch.Generator().manual_seed(41)
    x = random_features((3, 11, 6, 7), torch.float32, g, ties=True)
    rois = random_rois(25, 3, 6, 7, 1.0, g).to(torch.float32)
    _, argmax = run_forward(backend, x, rois, (3, 3), 1.0)
    grad_output = torch.randn(argmax.shape, generator=g)
    tuned = make_backend("parallel", backward_block_bytes=block_bytes)
    _assert_sums_as_serial(tuned, grad_output, grad_output, argmax, rois, x)


def _assert_sums_as_serial(tuned, given, grad_output, argmax, rois, x):
    """`tuned`'s float32 gradient from `given` (grad_output, in any layout) has the serial
    default kernel's bits, and matches the reference."""
    default = _backward(make_backend("serial"), grad_output, argmax, rois, x)
    grad = _backward(tuned, given, argmax, rois, x)
    assert torch.equal(default.view(torch.int32), grad.view(torch.int32))
    expected = reference_roi_pool_backward(grad_output, argmax, rois, x.shape)
    torch.testing.assert_close(grad.to(torch.float64), expected, rtol=1e-5, atol=1e-6)


def test_backward_empty(backend):
    argmax = torch.zeros(0, 3, 2, 2, dtype=torch.int32)
    x = torch.zeros(2, 3, 4, 4)
    grad = _backward(backend, torch.zeros(0, 3, 2, 2), argmax, torch.zeros(0, 5), x)
    assert torch.equal(grad, torch.zeros(2, 3, 4, 4))


def _grad_in_layout(grad: torch.Tensor, name: str) -> torch.Tensor:
    if name == "channels_last":
        return grad.contiguous(memory_format=torch.channels_last)
    if name == "bins-apart":  # bin rows not adjacent: the bins cannot be walked with one stride
        wide = torch.full((*grad.shape[:3], grad.shape[3] + 2), math.nan, dtype=grad.dtype)
        wide[..., : grad.shape[3]] = grad
        return wide[..., : grad.shape[3]]
    return grad


@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "bins-apart"])
@pytest.mark.parametrize("prefetch_bytes", [0, 2**30], ids=["no-prefetch", "prefetch"])
def test_backward_prefetch_and_gradient_layout_do_not_change_results(
    backend, grad_layout, prefetch_bytes
):
    """Tasks that prefetch the ROIs ahead and tasks that do not add the same values in the same
    order, whatever the gradient's strides."""
    g = torch.Generator().manual_seed(43)
    x = random_features((2, 5, 9, 8), torch.float32, g, ties=True)
    rois = random_rois(40, 2, 9, 8, 1.0, g).to(torch.float32)
    _, argmax = run_forward(backend, x, rois, (3, 2), 1.0)
    grad_output = torch.randn(argmax.shape, generator=g)
    tuned = make_backend("parallel", backward_prefetch_bytes=prefetch_bytes, backward_block_bytes=1)
    given = _grad_in_layout(grad_output, grad_layout)
    _assert_sums_as_serial(tuned, given, grad_output, argmax, rois, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_widens_16_bit_gradients_exactly(backend, dtype):
    """16-bit gradients are read as raw bits and widened in the kernel: the same bits as
    summing their float32 conversion and rounding once, special values included (subnormals,
    signed zeros, infinities, NaN)."""
    g = torch.Generator().manual_seed(47)
    x = random_features((2, 6, 7, 9), torch.float32, g, ties=True).to(dtype)
    rois = random_rois(30, 2, 7, 9, 1.0, g)
    _, argmax = run_forward(backend, x, rois, (3, 3), 1.0)
    grad_output = torch.randn(argmax.shape, generator=g).to(dtype)
    flat = grad_output.view(-1)
    tiny = torch.finfo(dtype).tiny
    specials = [tiny / 4, -tiny / 8, 0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 1e-3]
    flat[: 9 * len(specials)] = torch.tensor(specials, dtype=dtype).repeat_interleave(9)
    # NaNs with payloads, quiet and signalling (the quiet bit clear), as raw bits.
    payloads = [0x7C01, 0xFD55, 0x7E37] if dtype == torch.float16 else [0x7F81, 0xFFA5, 0x7FC3]
    nans = torch.tensor(payloads, dtype=torch.int32).to(torch.int16).view(dtype)
    flat[-9 * len(payloads) :] = nans.repeat_interleave(9)
    grad = _backward(backend, grad_output, argmax, rois, x)
    widened = _backward(make_backend("serial"), grad_output.float(), argmax, rois, x.float())
    assert grad.dtype == dtype
    assert torch.equal(grad.view(torch.int16), widened.to(dtype).view(torch.int16))
    expected = reference_roi_pool_backward(grad_output, argmax, rois, x.shape).to(dtype)
    torch.testing.assert_close(grad, expected, rtol=1e-2, atol=1e-2, equal_nan=True)


def test_backward_widens_float16_subnormals_under_flush_to_zero():
    """float16 subnormal gradients are widened exactly even where the calling thread flushes
    subnormals (`torch.set_flush_denormal`): they are normal float32 values."""
    g = torch.Generator().manual_seed(53)
    x = random_features((1, 4, 6, 7), torch.float32, g, ties=True).to(torch.float16)
    rois = random_rois(20, 1, 6, 7, 1.0, g)
    serial = make_backend("serial")
    _, argmax = run_forward(serial, x, rois, (2, 2), 1.0)
    subnormals = torch.randint(1, 1024, argmax.shape, generator=g, dtype=torch.int32)
    grad_output = subnormals.to(torch.int16).view(torch.float16)
    expected = _backward(serial, grad_output.float(), argmax, rois, x.float()).to(torch.float16)
    assert expected.abs().max() > 0
    # Sums of a few multiples of 2^-24 are exact in float32 and float64 alike.
    reference = reference_roi_pool_backward(grad_output, argmax, rois, x.shape)
    assert torch.equal(expected, reference.to(torch.float16))
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        grad = _backward(serial, grad_output, argmax, rois, x)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(grad.view(torch.int16), expected.view(torch.int16))
