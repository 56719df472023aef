"""Zero-copy NumPy views of torch tensors, and the huge-page hint for large fresh buffers.

Importing this module does not import numba.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import torch

_HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE = 14


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask Linux to back the whole 2 MiB pages inside [address, address + nbytes) with huge pages.

    Only a hint, for large freshly allocated buffers (fewer, cheaper page faults on first touch);
    a no-op elsewhere, or when the kernel refuses.
    """
    if _madvise is None:
        return
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)


def advise_tensor(tensor: torch.Tensor, min_bytes: int) -> None:
    """`advise_huge_pages` for a tensor's memory when it spans at least `min_bytes`."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes >= min_bytes:
        advise_huge_pages(tensor.data_ptr(), nbytes)


def flat_storage(tensor: torch.Tensor, view_dtype: torch.dtype | None = None) -> np.ndarray:
    """A 1-D NumPy view of the storage `tensor` spans, starting at its first element.

    Element ``i`` of `tensor` (multi-index) is at ``sum(i_d * tensor.stride(d))`` in the view.
    No data is copied. `view_dtype` reinterprets the bits (same element size). `tensor` must be
    a non-empty CPU strided tensor.
    """
    tensor = tensor.detach()
    if tensor.is_contiguous():
        flat = tensor.view(-1)
    else:
        span = 1 + sum(
            (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
        )
        flat = torch.as_strided(tensor, (span,), (1,), tensor.storage_offset())
    if view_dtype is not None:
        flat = flat.view(view_dtype)
    if flat.is_conj() or flat.is_neg():
        flat = flat.resolve_conj().resolve_neg()
    return flat.numpy()
