"""Large CPU output buffers reused across calls, instead of fresh pages from the system each time.

A CPU tensor of many megabytes is a fresh anonymous mapping: PyTorch's allocator takes it from
the system and gives it back when the tensor is freed, so every call of a training loop pays the
system's page faults and zero-filling on its outputs again before writing them, which can take
as long as the pooling itself (docs/benchmarks.md, "CPU"). roi_ops allocates its own large CPU
outputs here: each one is a view of a mapping that goes back to an idle list when the last
tensor using it is freed, and the next call of a similar size takes it from there, already in
memory.

Bounds: requests below `MIN_BYTES` take ``torch.empty``; the idle list keeps at most
``min(limit, peak)`` bytes, where `peak` is the most bytes of these buffers ever in use at once
(so it never holds more than the program itself needed) and `limit` is
``ROI_OPS_HOST_CACHE_BYTES`` (default `DEFAULT_LIMIT_BYTES`; ``0`` turns the reuse off);
`release_host_memory` empties it. The tensors are ordinary contiguous CPU tensors, except that
their storage cannot be resized (``resize_`` to more elements raises), like any tensor made
by ``torch.from_numpy``.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .config import environ_get

LIMIT_ENV = "ROI_OPS_HOST_CACHE_BYTES"
DEFAULT_LIMIT_BYTES = 4 << 30
MIN_BYTES = 4 << 20
# Mappings are whole huge pages, aligned to one (transparent huge pages fill only aligned 2 MiB).
GRANULE_BYTES = 2 << 20
# A request may take an idle buffer up to this much larger than it needs (K varies by call).
MAX_SLACK = 1.5

_LIMIT_KEY = LIMIT_ENV.encode()


@dataclass(frozen=True)
class HostMemoryStats:
    """What the cache holds: bytes idle and in use, the peak in use, buffers made and reused."""

    idle_bytes: int
    in_use_bytes: int
    peak_in_use_bytes: int
    mapped: int
    reused: int


class _Buffer:
    """One mapping and the offset of its first 2 MiB boundary."""

    __slots__ = ("mapping", "offset", "size")

    def __init__(self, size: int) -> None:
        self.mapping = mmap.mmap(-1, size + GRANULE_BYTES)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.mapping.madvise(mmap.MADV_HUGEPAGE)
        address = np.frombuffer(self.mapping, dtype=np.uint8, count=1).ctypes.data
        self.offset = -address % GRANULE_BYTES
        self.size = size


class _Cache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: OrderedDict[int, _Buffer] = OrderedDict()  # id -> buffer, oldest first
        self.idle_bytes = 0
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0
        self.mapped = 0
        self.reused = 0

    def take(self, nbytes: int) -> _Buffer:
        """An idle buffer of at least `nbytes` (the smallest within `MAX_SLACK`), or a new one."""
        with self.lock:
            best = None
            for key, buffer in self.idle.items():
                if nbytes <= buffer.size <= nbytes * MAX_SLACK + GRANULE_BYTES and (
                    best is None or buffer.size < best[1].size
                ):
                    best = key, buffer
            if best is not None:
                del self.idle[best[0]]
                self.idle_bytes -= best[1].size
                self.reused += 1
                buffer = best[1]
            else:
                buffer = None
        fresh = buffer is None
        if fresh:
            buffer = _Buffer(-(-nbytes // GRANULE_BYTES) * GRANULE_BYTES)
        with self.lock:
            self.mapped += fresh
            self.in_use_bytes += buffer.size
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
        return buffer

    def give_back(self, buffer: _Buffer) -> None:
        """Called when the last tensor on `buffer` is freed: keep it idle if the bound allows,
        dropping the oldest idle buffers to make room; otherwise unmap it."""
        dropped = []
        with self.lock:
            self.in_use_bytes -= buffer.size
            try:
                limit = _limit()
            except ValueError:  # set badly since; the next allocation says so
                limit = 0
            bound = min(limit, self.peak_in_use_bytes)
            if buffer.size <= bound:
                while self.idle and self.idle_bytes + buffer.size > bound:
                    _, old = self.idle.popitem(last=False)
                    self.idle_bytes -= old.size
                    dropped.append(old)
                self.idle[id(buffer)] = buffer
                self.idle_bytes += buffer.size
            else:
                dropped.append(buffer)
        del dropped  # unmapped as their last reference goes, outside the lock

    def release(self) -> int:
        with self.lock:
            idle = list(self.idle.values())
            self.idle.clear()
            self.idle_bytes = 0
        return sum(buffer.size for buffer in idle)  # unmapped as `idle` goes


_cache = _Cache()


def _after_fork_in_child() -> None:
    # A fork while another thread held the lock would leave it held forever in the child.
    _cache.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _limit() -> int:
    raw = environ_get(LIMIT_ENV, _LIMIT_KEY)
    if raw is None or not raw.strip():
        return DEFAULT_LIMIT_BYTES
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"{LIMIT_ENV}: expected a whole number of bytes (0 turns the reuse of CPU output "
            f"buffers off), got {raw!r}; set it to e.g. {DEFAULT_LIMIT_BYTES} or unset it"
        )
    return value


def empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` and `dtype` on `device`: on the CPU, on a
    reused buffer when it is at least `MIN_BYTES` and reuse is on (see the module's docstring);
    elsewhere ``torch.empty``.

    Raises:
        ValueError: ``ROI_OPS_HOST_CACHE_BYTES`` is set to something other than a whole number
            of bytes.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    if nbytes < MIN_BYTES or _limit() == 0:
        return torch.empty(shape, dtype=dtype)
    try:
        buffer = _cache.take(nbytes)
    except OSError:  # no mapping to be had: torch's allocator then says why, in its own words
        return torch.empty(shape, dtype=dtype)
    array = np.frombuffer(buffer.mapping, dtype=np.uint8, count=nbytes, offset=buffer.offset)
    # The array lives as long as any tensor on its memory (torch.from_numpy keeps it): when it
    # goes, so does the last user of the buffer.
    weakref.finalize(array, _cache.give_back, buffer).atexit = False
    return torch.from_numpy(array).view(dtype).view(shape)


def release_host_memory() -> int:
    """Unmap every idle CPU output buffer now; returns the bytes released. Buffers still in use
    are unaffected (they go back to the idle list, within its bound, when freed)."""
    return _cache.release()


def host_memory_stats() -> HostMemoryStats:
    """The cache's counters (see `HostMemoryStats`)."""
    with _cache.lock:
        return HostMemoryStats(
            _cache.idle_bytes,
            _cache.in_use_bytes,
            _cache.peak_in_use_bytes,
            _cache.mapped,
            _cache.reused,
        )
