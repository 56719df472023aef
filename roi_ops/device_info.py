"""Facts about a CUDA device that backends size their launches by, read once per device."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch


class CudaSizes(NamedTuple):
    """What launch planning needs to know about one CUDA device.

    Attributes:
        multiprocessors: streaming multiprocessors (SMs).
        l2_bytes: L2 cache size in bytes (0 when torch does not report it).
        shared_per_block_optin: the most shared memory one block may opt in to, in bytes.
    """

    multiprocessors: int
    l2_bytes: int
    shared_per_block_optin: int


@functools.cache
def cuda_sizes(index: int) -> CudaSizes:
    """`CudaSizes` of CUDA device `index` (cached for the process)."""
    properties = torch.cuda.get_device_properties(index)
    return CudaSizes(
        properties.multi_processor_count,
        getattr(properties, "L2_cache_size", 0),
        getattr(properties, "shared_memory_per_block_optin", 48 * 1024),
    )
