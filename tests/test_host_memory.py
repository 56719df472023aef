"""The reuse of large CPU output buffers (roi_ops.host_memory)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import roi_ops
from roi_ops import host_memory
from roi_ops.config import poisoned_outputs
from roi_ops.host_memory import MIN_BYTES, host_memory_stats, release_host_memory

BIG = (MIN_BYTES // 4 + 1024,)  # just over the threshold in float32


@pytest.fixture(autouse=True)
def _empty_cache(monkeypatch):
    monkeypatch.delenv(host_memory.LIMIT_ENV, raising=False)
    gc.collect()
    release_host_memory()
    yield
    gc.collect()
    release_host_memory()


def test_a_freed_buffer_is_reused_and_a_live_one_never():
    first = host_memory.empty(BIG, torch.float32)
    first.fill_(1.0)
    second = host_memory.empty(BIG, torch.float32)  # first is alive: another buffer
    assert second.data_ptr() != first.data_ptr()
    second.fill_(2.0)
    assert torch.all(first == 1.0)
    address = first.data_ptr()
    before = host_memory_stats().reused
    del first
    third = host_memory.empty(BIG, torch.float32)
    assert third.data_ptr() == address
    assert host_memory_stats().reused == before + 1
    assert torch.all(second == 2.0)


def test_a_view_keeps_its_buffer():
    tensor = host_memory.empty(BIG, torch.float32)
    view = tensor[100:]
    address = tensor.data_ptr()
    del tensor
    again = host_memory.empty(BIG, torch.float32)
    assert again.data_ptr() != address
    view.fill_(3.0)
    again.fill_(4.0)
    assert torch.all(view == 3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int32])  # fmt: skip
def test_tensors_are_ordinary_contiguous_cpu_tensors(dtype):
    shape = (3, 5, 7, MIN_BYTES // dtype.itemsize // 100)
    tensor = host_memory.empty(shape, dtype)
    assert tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous()
    assert tensor.device.type == "cpu" and not tensor.requires_grad
    assert tensor.data_ptr() % host_memory.GRANULE_BYTES == 0
    values = torch.arange(tensor.numel()).reshape(shape).to(dtype)
    tensor.copy_(values)
    assert torch.equal(tensor, values)


def test_small_requests_and_zero_limit_take_plain_tensors(monkeypatch):
    small = host_memory.empty((10, 10), torch.float32)
    small.resize_(1000, 1000)  # an ordinary, resizable tensor
    elsewhere = host_memory.empty(BIG, torch.float32, "meta")  # other devices: torch.empty
    assert elsewhere.is_meta and elsewhere.shape == BIG
    monkeypatch.setenv(host_memory.LIMIT_ENV, "0")
    mapped = host_memory_stats().mapped
    plain = host_memory.empty(BIG, torch.float32)
    plain.resize_(BIG[0] * 2)
    assert host_memory_stats().mapped == mapped


def test_a_bad_limit_names_the_variable(monkeypatch):
    monkeypatch.setenv(host_memory.LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match="ROI_OPS_HOST_CACHE_BYTES.*'lots'"):
        host_memory.empty(BIG, torch.float32)


def test_idle_bytes_stay_within_the_limit_and_the_peak(monkeypatch):
    size = 3 * MIN_BYTES // 2
    monkeypatch.setenv(host_memory.LIMIT_ENV, str(2 * size))
    tensors = [host_memory.empty((size // 4,), torch.float32) for _ in range(4)]
    del tensors
    stats = host_memory_stats()
    assert stats.in_use_bytes == 0
    assert 0 < stats.idle_bytes <= 2 * size
    monkeypatch.delenv(host_memory.LIMIT_ENV)
    release_host_memory()
    one = host_memory.empty((size // 4,), torch.float32)
    del one
    # The peak is 4 buffers: one idle buffer is within it.
    assert host_memory_stats().idle_bytes == size
    assert release_host_memory() == size
    assert host_memory_stats().idle_bytes == 0


def test_a_much_larger_idle_buffer_is_not_taken():
    large = host_memory.empty((10 * MIN_BYTES // 4,), torch.float32)
    address = large.data_ptr()
    del large
    small = host_memory.empty(BIG, torch.float32)
    assert small.data_ptr() != address
    near = host_memory.empty((9 * MIN_BYTES // 4,), torch.float32)
    assert near.data_ptr() == address


def test_threads_never_share_a_live_buffer():
    errors = []

    def work(value: float) -> None:
        for _ in range(30):
            tensor = host_memory.empty(BIG, torch.float32)
            tensor.fill_(value)
            if not torch.all(tensor == value):
                errors.append(value)

    threads = [threading.Thread(target=work, args=(float(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert host_memory_stats().in_use_bytes == 0


def _reference(x, rois, size, scale):
    return roi_ops.roi_pool(x, rois, size, scale, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_roi_pool_outputs_are_reused_and_exact(backend):
    if backend not in {info.name for info in roi_ops.list_backends() if info.available}:
        pytest.skip(f"{backend} is not available")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 40, 50, generator=g)
    boxes = torch.rand(3000, 4, generator=g) * 600
    rois = torch.cat([torch.randint(0, 2, (3000, 1), generator=g).float(),
                      boxes[:, :2], boxes[:, :2] + boxes[:, 2:] / 4], 1)  # fmt: skip
    expected = _reference(x, rois, 7, 1 / 16)
    leaf = x.clone().requires_grad_(True)
    with poisoned_outputs():
        kept = roi_ops.roi_pool(leaf, rois, 7, 1 / 16, backend=backend)
        reused_before = host_memory_stats().reused
        for _ in range(2):
            out = roi_ops.roi_pool(leaf, rois, 7, 1 / 16, backend=backend)
            assert torch.equal(out, expected)
            assert out.data_ptr() != kept.data_ptr()
            out.sum().backward()
            del out
    assert host_memory_stats().reused >= reused_before + 2  # output and argmax, second call
    assert torch.equal(kept, expected)
    leaf.grad = None
    kept.backward(torch.ones_like(kept))
    reference_leaf = x.clone().requires_grad_(True)
    _reference(reference_leaf, rois, 7, 1 / 16).sum().backward()
    assert torch.equal(leaf.grad, reference_leaf.grad)


def test_multi_scale_outputs_come_from_the_cache():
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 64, 64 >> i, 80 >> i, generator=g) for i in range(3)]
    boxes = torch.rand(4000, 4, generator=g) * 200
    rois = torch.cat([torch.randint(0, 2, (4000, 1), generator=g).float(),
                      boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)  # fmt: skip
    scales = [1 / 4, 1 / 8, 1 / 16]
    expected = roi_ops.multi_scale_roi_pool(features, rois, 7, scales, backend="torch")
    mapped = host_memory_stats().mapped
    for _ in range(2):
        with poisoned_outputs():
            out = roi_ops.multi_scale_roi_pool(features, rois, 7, scales)
        assert torch.equal(out, expected)
        del out
    stats = host_memory_stats()
    assert stats.mapped > mapped and stats.reused >= 1


def test_no_mapping_falls_back_to_torch(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(host_memory.mmap, "mmap", refuse)
    stats = host_memory_stats()
    tensor = host_memory.empty(BIG, torch.float32)
    tensor.resize_(BIG[0] * 2)  # torch's own, resizable
    after = host_memory_stats()
    assert (after.mapped, after.in_use_bytes) == (stats.mapped, stats.in_use_bytes)


def test_a_limit_set_badly_later_drops_buffers_quietly(monkeypatch):
    tensor = host_memory.empty(BIG, torch.float32)
    monkeypatch.setenv(host_memory.LIMIT_ENV, "-1")
    del tensor  # the finalizer must not raise
    stats = host_memory_stats()
    assert stats.in_use_bytes == 0 and stats.idle_bytes == 0
