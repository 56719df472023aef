"""roi_ops.layout: when kernels may read channels as aligned vectors."""

import torch

from roi_ops.layout import aligned_channel_vector

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _last(channels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(2, channels, 5, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)


def test_whole_aligned_vectors_of_every_dtype():
    assert [aligned_channel_vector(_last(32, d)) for d in DTYPES] == [8, 8, 4, 2]
    assert aligned_channel_vector(_last(32), vector_bytes=8) == 2
    assert aligned_channel_vector(_last(2, torch.float64)) == 2


def test_anything_misaligned_gives_one():
    assert aligned_channel_vector(_last(20, torch.float16)) == 1  # C not whole vectors
    assert aligned_channel_vector(_last(20)[:, :18]) == 1  # C = 18
    assert aligned_channel_vector(_last(20)[:, 1:17]) == 1  # the pointer 4 bytes in
    assert aligned_channel_vector(torch.empty(2, 32, 5, 6)) == 1  # NCHW: channel stride H * W
    padded = torch.empty(2, 5, 6, 21)[..., :20].permute(0, 3, 1, 2)  # W stride 21
    assert padded.stride(1) == 1 and aligned_channel_vector(padded) == 1
    assert aligned_channel_vector(_last(32, torch.float64), vector_bytes=8) == 1  # one element
