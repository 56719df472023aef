"""roi_ops' shared backward (a deterministic scatter) and the backward's own gradient (a gather).

Backends without a backward of their own, and backends whose backward is not deterministic under
``torch.use_deterministic_algorithms(True)``, get their gradients from `scatter_backward`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import accumulate_dtype, batch_indices  # noqa: F401  (re-exported)


def _flat_positions(argmax: Tensor, batch_index: Tensor, channels: int, plane: int) -> Tensor:
    """(K, C, PH, PW) int64 index of each argmax in the flattened (N*C*H*W) input."""
    channel = torch.arange(channels, device=argmax.device)
    base = (batch_index[:, None] * channels + channel[None, :]) * plane
    return base[:, :, None, None] + argmax.clamp(min=0).to(torch.int64)


def _channels_last_positions(argmax: Tensor, batch_index: Tensor, channels: int, plane: int):
    """(K, C, PH, PW) int64 index of each argmax in the flattened (N*H*W*C) input."""
    channel = torch.arange(channels, device=argmax.device)
    pixel = batch_index[:, None, None, None] * plane + argmax.clamp(min=0).to(torch.int64)
    return pixel * channels + channel[None, :, None, None]


def scatter_backward(
    grad_output: Tensor,
    argmax: Tensor,
    batch_index: Tensor,
    input_shape: tuple[int, int, int, int],
    input_dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """grad_input[b_k, c].flat[argmax] += grad_output, run-to-run deterministic.

    Accumulates float16/bfloat16 in float32 and rounds once. `index_put_` with accumulate is
    deterministic under ``torch.use_deterministic_algorithms(True)``.

    Returns:
        (N, C, H, W) tensor of `input_dtype`, dense in `memory_format` (contiguous_format or
        channels_last).
    """
    num_images, channels, height, width = input_shape
    accumulate = accumulate_dtype(input_dtype)
    size = num_images * channels * height * width
    # One spare element past the end takes the argmax -1 entries: no boolean mask, so no
    # data-dependent shape (and no device synchronisation on CUDA).
    grad = torch.zeros(size + 1, dtype=accumulate, device=grad_output.device)
    channels_last = memory_format == torch.channels_last
    if argmax.numel():
        flat = _channels_last_positions if channels_last else _flat_positions
        positions = flat(argmax, batch_index, channels, height * width)
        positions = torch.where(argmax >= 0, positions, size)
        grad.index_put_((positions.reshape(-1),), grad_output.to(accumulate).reshape(-1), True)
    grad = grad[:size]
    if channels_last:  # .to keeps the strides of the (N, H, W, C) buffer
        return grad.view(num_images, height, width, channels).permute(0, 3, 1, 2).to(input_dtype)
    return grad.view(input_shape).to(input_dtype)


def gather_at_argmax(grad_input_grad: Tensor, argmax: Tensor, batch_index: Tensor) -> Tensor:
    """Gradient of the backward: grad_input_grad[b_k, c].flat[argmax] (0 where argmax is -1)."""
    _, channels, height, width = grad_input_grad.shape
    positions = _flat_positions(argmax, batch_index, channels, height * width)
    gathered = grad_input_grad.reshape(-1)[positions]
    return torch.where(argmax >= 0, gathered, torch.zeros_like(gathered))
