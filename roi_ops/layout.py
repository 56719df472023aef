"""Memory-layout facts about an input that backend kernels share."""

from __future__ import annotations

import torch


def aligned_channel_vector(input: torch.Tensor, vector_bytes: int = 16) -> int:
    """Channels per `vector_bytes`-byte vector when a kernel may read every pixel's channels as
    whole aligned vectors, else 1.

    Args:
        input: (N, C, H, W) tensor, any strides.
        vector_bytes: the vector's size in bytes, a power of two.

    Returns:
        ``vector_bytes // element size`` when the channel stride is 1, C and the N, H and W
        strides are multiples of it and the data pointer is `vector_bytes`-aligned (so every
        vector of channels a kernel loads starts aligned); 1 otherwise, including when one
        element fills the vector.
    """
    lanes = vector_bytes // input.element_size()
    s_n, s_c, s_h, s_w = input.stride()
    aligned = (
        lanes > 1
        and s_c == 1
        and input.shape[1] % lanes == 0
        and s_n % lanes == 0
        and s_h % lanes == 0
        and s_w % lanes == 0
        and input.data_ptr() % vector_bytes == 0
    )
    return lanes if aligned else 1


def gradient_memory_format(input: torch.Tensor) -> torch.memory_format:
    """The memory format in which roi_pool returns the gradient of `input`.

    ``torch.channels_last`` when the (N, C, H, W) `input` is dense in channels_last and not also
    contiguous (so autograd can keep the gradient as it is, without copying it into the input's
    layout), else ``torch.contiguous_format``.
    """
    if input.dim() == 4 and not input.is_contiguous():
        if input.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format
