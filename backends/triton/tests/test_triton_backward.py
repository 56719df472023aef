"""The backward scatter against the reference scatter, exactly (small integer gradients make
every float sum exact, whatever order the atomics run in)."""

from __future__ import annotations

import math

import pytest
import torch

from roi_ops.testing import contract_cases, reference_roi_pool_backward

pytest.importorskip("triton")

from triton_cases import (  # noqa: E402
    DEVICES,
    DTYPE_IDS,
    DTYPES,
    LAYOUTS,
    MEMORY_FORMATS,
    run_backward,
    run_forward,
)

from roi_ops_triton import launch  # noqa: E402
from roi_ops_triton.tuning import Tuning  # noqa: E402

ALWAYS_CHANNELS_LAST = Tuning(gradient_layout="channels_last")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block", [None, 16], ids=["chosen-block", "block-16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_matches_the_reference_scatter(device, dtype, block, layout, monkeypatch):
    tuning = ALWAYS_CHANNELS_LAST  # whatever the sizes
    if block is not None:  # several programs per ROI, and a split grid
        tuning = Tuning(
            gradient_layout="channels_last", backward_outputs=block, backward_outputs_streamed=block
        )
        monkeypatch.setattr(launch, "MAX_GRID_Y", 3)
    memory_format = MEMORY_FORMATS[layout]
    case = contract_cases(device, dtype, seed=4)[0]
    shape = tuple(case.input.shape)
    assert shape[1] > 1 and shape[2] * shape[3] > 1  # the two layouts differ
    rois = case.rois_tensor()
    size = (case.output_size,) * 2 if isinstance(case.output_size, int) else case.output_size
    _, argmax = run_forward(case.input, rois, size, case.spatial_scale)
    g = torch.Generator().manual_seed(1)
    grad_output = torch.randint(1, 5, argmax.shape, generator=g).to(dtype).to(device)

    def backward(grad):
        result = run_backward(grad, argmax, rois, shape, dtype, memory_format, tuning=tuning)
        assert result.dtype == dtype and result.is_contiguous(memory_format=memory_format)
        return result.cpu().double()

    expected = reference_roi_pool_backward(grad_output, argmax, rois, shape)
    assert torch.equal(backward(grad_output), expected)
    # Zero strides (an expanded gradient) and a transposed one.
    ones = torch.ones((), dtype=dtype, device=device).expand(argmax.shape)
    assert torch.equal(backward(ones), reference_roi_pool_backward(ones, argmax, rois, shape))
    flipped = grad_output.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(backward(flipped), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rois_dtype", [torch.float16, torch.float32, torch.float64])
def test_the_image_comes_from_the_rois_in_the_kernel(device, rois_dtype):
    """Fractional, negative-zero-truncating and last-image batch indices scatter into the image
    trunc(rois[k, 0]); invalid rows (NaN, out of range) add nothing."""
    dtype = torch.float64 if rois_dtype == torch.float64 else torch.float32
    if rois_dtype == torch.float16:
        dtype = torch.float16
    x = torch.arange(3 * 2 * 5 * 6, dtype=torch.float64).reshape(3, 2, 5, 6).to(dtype).to(device)
    rows = [
        [1.7, 0, 0, 3, 3],
        [-0.5, 1, 1, 5, 4],
        [2.99, 0, 2, 5, 4],
        [math.nan, 0, 0, 2, 2],
        [3.0, 0, 0, 2, 2],
        [0.0, 2, 0, 4, 4],
    ]
    rois = torch.tensor(rows, dtype=torch.float64).to(rois_dtype).to(device)
    shape = (3, 2, 5, 6)
    _, argmax = run_forward(x, rois, (2, 2), 1.0)
    grad_output = torch.arange(1, argmax.numel() + 1, dtype=torch.float64).reshape(argmax.shape)
    grad_output = grad_output.to(dtype).to(device)
    grad = run_backward(grad_output, argmax, rois, shape, dtype)
    expected = reference_roi_pool_backward(grad_output, argmax, rois, shape)
    assert torch.equal(grad.cpu().double(), expected)
    assert expected[1].sum() > 0 and expected[2].sum() > 0 and expected[0].sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_contiguous_gradient_where_grad_output_outnumbers_the_input(device):
    shape = (1, 3, 4, 4)
    argmax = torch.zeros(5, 3, 2, 2, dtype=torch.int32, device=device)  # 60 outputs, 48 inputs
    rois = torch.zeros(5, 5, device=device)
    grad_output = torch.ones(5, 3, 2, 2, device=device)
    grad = run_backward(grad_output, argmax, rois, shape, torch.float32, torch.channels_last)
    assert grad.is_contiguous() and grad[0, :, 0, 0].tolist() == [20.0] * 3


@pytest.mark.parametrize("device", DEVICES)
def test_empty_problems_give_zero_gradients(device):
    argmax = torch.zeros(0, 3, 2, 2, dtype=torch.int32, device=device)
    grad = run_backward(
        torch.ones(0, 3, 2, 2, device=device), argmax, torch.zeros(0, 5, device=device),
        (2, 3, 4, 4), torch.bfloat16,
    )  # fmt: skip
    assert grad.dtype == torch.bfloat16 and grad.shape == (2, 3, 4, 4) and not grad.any()
