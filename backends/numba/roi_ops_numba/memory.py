"""Zero-copy NumPy views of torch tensors (one tensor, or several through one base), and the
huge-page hint for large fresh buffers.

Importing this module does not import numba.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence

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
        flat = torch.as_strided(tensor, (storage_span(tensor),), (1,), tensor.storage_offset())
    if view_dtype is not None:
        flat = flat.view(view_dtype)
    if flat.is_conj() or flat.is_neg():
        flat = flat.resolve_conj().resolve_neg()
    return flat.numpy()


class _Memory:
    """Raw memory as NumPy sees it (``__array_interface__``); holds `owners` alive."""

    def __init__(self, address: int, count: int, typestr: str, owners: tuple) -> None:
        self.__array_interface__ = {
            "data": (address, False),
            "shape": (count,),
            "typestr": typestr,
            "version": 3,
        }
        self.owners = owners


def storage_span(tensor: torch.Tensor) -> int:
    """Elements from `tensor`'s first element to its last one in memory, inclusive."""
    return 1 + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def same_base_misfit(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why `shared_storage` cannot address `tensors` from one base, or None if it can: the
    distance between two non-empty tensors' first elements must be a whole number of
    elements."""
    pointers = [t.data_ptr() for t in tensors if t.numel()]
    itemsize = tensors[0].element_size()
    if any((p - pointers[0]) % itemsize for p in pointers):
        return f"the levels' memory is not aligned to their {itemsize}-byte elements"
    return None


def level_offsets(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Each tensor's first element's index in `shared_storage` of `tensors` (0 for an empty
    tensor, which must never be addressed)."""
    pointers = [t.data_ptr() for t in tensors if t.numel()]
    if len(tensors) == 1 or not pointers:
        return [0] * len(tensors)
    itemsize = tensors[0].element_size()
    base = min(pointers)
    return [(t.data_ptr() - base) // itemsize if t.numel() else 0 for t in tensors]


def shared_storage(
    tensors: Sequence[torch.Tensor], view_dtype: torch.dtype | None = None
) -> np.ndarray:
    """One 1-D NumPy view through which every tensor of `tensors` (one dtype, CPU, strided, at
    least one not empty) is addressed.

    Element ``i`` (multi-index) of ``tensors[l]`` is at ``level_offsets(tensors)[l] +
    sum(i_d * stride(d))``. For one tensor this is `flat_storage`. For several, the view starts
    at the lowest first element and ends after the highest last one: it spans whatever memory
    lies between the tensors too, which is only ever addressed through their own offsets and
    strides (the kernels check no bounds, and address nothing else). Nothing is copied; the view
    keeps the tensors alive. `view_dtype` reinterprets the bits (same element size). Requires
    `same_base_misfit` to be None.
    """
    if len(tensors) == 1:
        return flat_storage(tensors[0], view_dtype)
    itemsize = tensors[0].element_size()
    present = [t.detach() for t in tensors if t.numel()]
    base = min(t.data_ptr() for t in present)
    end = max(t.data_ptr() + storage_span(t) * itemsize for t in present)
    typestr = torch.empty((), dtype=view_dtype or tensors[0].dtype).numpy().dtype.str
    return np.asarray(_Memory(base, (end - base) // itemsize, typestr, tuple(present)))
