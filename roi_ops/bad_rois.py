"""Finding invalid ROIs without waiting for the device: the bad-ROI log.

A ROI row is *invalid* when its batch index ``trunc(rois[k, 0])`` is outside [0, N) or one of
its five values is NaN or infinite (docs/contract.md). Such rows pool to zeros with argmax -1;
by default roi_ops also raises an error that names the first of them and its values.

Reading the rows on the host would synchronise a CUDA device on every call. Instead, the forward
kernel of a backend that declares ``reports_bad_rois`` records invalid rows in a small int64 log
(`RoIPoolProblem.bad_roi_log`), and roi_ops reads the log later, without waiting. The log has
`SLOTS` int64 entries, each starting at `EMPTY`. For every invalid row k (k < 2^31) of a call on
an input with N images, a backend performs these atomic minimums on signed 64-bit integers (any
thread, any number of times: the result is the same)::

    for j in 0..4:                      # the row's five values
        bits = IEEE binary64 bits of float64(rois[k, j])    (exact for every rois dtype)
        log[2j]     = min(log[2j],     (k << 32) | (bits & 0xFFFFFFFF))
        log[2j + 1] = min(log[2j + 1], (k << 32) | (bits >> 32))
    log[10] = min(log[10], (k << 32) | N)

Every key of row k is below every key of a later row, so each slot ends up holding the first
invalid row's piece, whatever the order the threads ran in. `decode` turns a log back into
(row, values, N); `record_bad_rois` is the same recording in torch ops, used for backends that do
not report themselves and as the reference in tests.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import torch

SLOTS = 12
EMPTY = 2**63 - 1  # int64 max: above every key
_LOW = 0xFFFFFFFF


@dataclass(frozen=True)
class BadRoi:
    """The first invalid ROI a log recorded."""

    row: int
    values: tuple[float, float, float, float, float]
    num_images: int

    def reason(self) -> str:
        """What is wrong with the row, in words."""
        batch, *coordinates = self.values
        finite = all(v == v and abs(v) != float("inf") for v in self.values)
        if not finite:
            return "a non-finite value"
        index = int(batch) if batch == batch else batch
        return f"batch index {index} outside [0, {self.num_images}) (N={self.num_images})"


def new_log(device: torch.device | str = "cpu", pin_memory: bool = False) -> torch.Tensor:
    """An empty log: an int64 tensor of `SLOTS` entries, each `EMPTY`."""
    log = torch.empty(SLOTS, dtype=torch.int64, device=device, pin_memory=pin_memory)
    return log.fill_(EMPTY)


def decode(log: torch.Tensor | list[int]) -> BadRoi | None:
    """The first invalid row recorded in `log` (a CPU tensor or list of `SLOTS` ints), or None."""
    slots = log.tolist() if isinstance(log, torch.Tensor) else list(log)
    if slots[0] == EMPTY:
        return None
    row = slots[0] >> 32
    values = []
    for j in range(5):
        bits = ((slots[2 * j + 1] & _LOW) << 32) | (slots[2 * j] & _LOW)
        values.append(struct.unpack("<d", struct.pack("<Q", bits))[0])
    return BadRoi(row, tuple(values), slots[10] & _LOW)


def invalid_rows(rois: torch.Tensor, num_images: int) -> torch.Tensor:
    """(K,) bool: which rows are invalid (in the geometry dtype, as the contract says)."""
    values = rois.float() if rois.dtype == torch.bfloat16 else rois
    batch = torch.trunc(values[:, 0])
    valid = torch.isfinite(values).all(dim=1) & (batch >= 0) & (batch < num_images)
    return ~valid


def record_bad_rois(log: torch.Tensor, rois: torch.Tensor, num_images: int) -> None:
    """Record the invalid rows of `rois` in `log` (same device) with torch ops, as a backend that
    declares ``reports_bad_rois`` does in its kernel. Never reads values on the host."""
    count = rois.shape[0]
    if count == 0:
        return
    bad = invalid_rows(rois, num_images)
    bits = rois.to(torch.float64).view(torch.int64)  # (K, 5)
    row = torch.arange(count, device=rois.device, dtype=torch.int64)[:, None] << 32
    pieces = torch.stack([row | (bits & _LOW), row | ((bits >> 32) & _LOW)], dim=2)
    keys = torch.cat(
        [pieces.reshape(count, 10), row | num_images, torch.full_like(row, EMPTY)], dim=1
    )
    keys = torch.where(bad[:, None], keys, torch.full_like(keys, EMPTY))
    torch.minimum(log, keys.amin(dim=0), out=log)


def error_message(bad: BadRoi, where: str) -> str:
    """The ValueError text for `bad`, found `where` (e.g. "in this call")."""
    finite = all(v == v and abs(v) != float("inf") for v in bad.values)
    if finite:
        fix = (
            f"the input has N={bad.num_images} images, so batch indices must be integers in "
            f"[0, {bad.num_images})"
        )
    else:
        fix = "drop or repair such rows (torch.isfinite(rois).all(1) marks the good ones)"
    return (
        f"rois: expected a batch index in [0, N) and finite values in every row, got row "
        f"{bad.row} = {list(bad.values)} {where}, which has {bad.reason()}; {fix}, or turn "
        "the value checks off with roi_ops.set_value_checks(False) to get zeros (argmax -1) "
        "for such rows"
    )


# Whether reporting kernels write straight into pinned host memory mapped into the device's
# address space (the host then reads their record as plain memory, with no copy). When False,
# they write a device-memory log that roi_ops copies to the host after each forward.
KERNEL_LOG_IN_HOST_MEMORY = True


class _CudaLog:
    """One CUDA device's log, read by the host without waiting.

    ``host`` is pinned memory in three parts of `SLOTS`: what reporting kernels write (when
    `KERNEL_LOG_IN_HOST_MEMORY`), a copy of the device-side log that roi_ops' own torch-op check
    keeps for backends that do not report (``fallback``), and a copy of the kernels' device-side
    log (when not `KERNEL_LOG_IN_HOST_MEMORY`). Every part only ever holds a record of some
    moment, so reading a part that a copy is still filling shows an older record, never a wrong
    one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            self.host = torch.full((3 * SLOTS,), EMPTY, dtype=torch.int64).pin_memory()
            self.fallback = new_log(device)
            self.kernel_device = None if KERNEL_LOG_IN_HOST_MEMORY else new_log(device)
        self.kernel = self.host[:SLOTS] if KERNEL_LOG_IN_HOST_MEMORY else self.kernel_device
        self.fallback_copy = self.host[SLOTS : 2 * SLOTS]
        self.kernel_copy = self.host[2 * SLOTS :]
        self.view = self.host.numpy()
        self.words = memoryview(self.view).cast("B").cast("q")  # reads give Python ints

    def dirty(self) -> bool:
        words = self.words
        return words[0] != EMPTY or words[SLOTS] != EMPTY or words[2 * SLOTS] != EMPTY

    def take(self) -> BadRoi | None:
        """The first recorded bad row (of any part), and clear the log."""
        view = self.view
        parts = (view[i * SLOTS : (i + 1) * SLOTS].tolist() for i in range(3))
        found = [bad for bad in map(decode, parts) if bad is not None]
        view[:] = EMPTY
        self.fallback.fill_(EMPTY)
        if self.kernel_device is not None:
            self.kernel_device.fill_(EMPTY)
        return min(found, key=lambda bad: bad.row) if found else None


_cuda_logs: dict[int, _CudaLog] = {}
_cuda_lock = threading.Lock()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _cuda_log(device: torch.device) -> _CudaLog:
    index = _index(device)
    log = _cuda_logs.get(index)
    if log is None:
        with _cuda_lock:
            log = _cuda_logs.get(index)
            if log is None:
                log = _cuda_logs[index] = _CudaLog(torch.device("cuda", index))
    return log


def raise_pending(device: torch.device) -> None:
    """Raise the bad ROI that earlier calls on CUDA `device` recorded and that has reached the
    host by now, if any (clearing it). Never waits for the device."""
    log = _cuda_logs.get(_index(device))
    if log is not None and log.dirty():
        bad = log.take()
        if bad is not None:
            raise ValueError(error_message(bad, f"of an earlier roi_ops call on {log.device}"))


def check_errors(device: torch.device | str | int | None = None) -> None:
    """Raise the first invalid ROI that earlier roi_ops calls recorded, waiting for them.

    On CUDA, default calls record invalid ROIs on the device instead of waiting for it, and the
    error is raised by a later roi_ops call (forward or backward) on that device that finds the
    record on the host. This function waits for the work queued so far on `device` (every CUDA
    device roi_ops has used when None; an int or string names one) and raises at once. CPU calls
    raise at the call, so there is nothing to wait for on the CPU.

    Raises:
        ValueError: naming the row and its values; the record is cleared.
    """
    if device is None:
        indices = list(_cuda_logs)
    else:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            return
        indices = [_index(device)]
    for index in indices:
        if index in _cuda_logs:
            torch.cuda.synchronize(index)
            raise_pending(torch.device("cuda", index))


def cuda_kernel_log(device: torch.device) -> torch.Tensor:
    """The log that reporting backends write into for a call on CUDA `device`."""
    return _cuda_log(device).kernel


def after_cuda_forward(device: torch.device) -> None:
    """After a reporting backend's forward: bring its record to the host (a queued copy, only
    when the kernels' log is in device memory)."""
    log = _cuda_logs[_index(device)]
    if log.kernel_device is not None:
        log.kernel_copy.copy_(log.kernel_device, non_blocking=True)


def record_on_cuda(rois: torch.Tensor, num_images: int, copy: bool = True) -> None:
    """roi_ops' own check for a backend that does not report: torch ops into the device-side
    log, then (when `copy`; not while a CUDA graph is being captured) a queued copy of it to
    the host. Never waits."""
    log = _cuda_log(rois.device)
    record_bad_rois(log.fallback, rois, num_images)
    if copy:
        log.fallback_copy.copy_(log.fallback, non_blocking=True)


_cpu_logs = threading.local()


def cpu_log() -> torch.Tensor:
    """This thread's log for CPU calls (read and cleared right after each call)."""
    log = getattr(_cpu_logs, "log", None)
    if log is None:
        log = _cpu_logs.log = new_log()
        _cpu_logs.view = log.numpy()
    return log


def raise_cpu(log: torch.Tensor) -> None:
    """Raise (and clear) what a CPU call recorded in `log`, the thread's `cpu_log`."""
    view = _cpu_logs.view
    if view[0] != EMPTY:
        bad = decode(view.tolist())
        view[:] = EMPTY
        raise ValueError(error_message(bad, "in this call"))
