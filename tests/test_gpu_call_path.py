"""GPU-only checks of the default call path: no device synchronisation, CUDA-graph capture, and
bad ROIs caught without waiting (default) or at the call (immediate). Skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

import roi_ops
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois
from roi_ops.testing import reference_roi_pool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_backends(include_torch: bool = False) -> list[str]:
    if not torch.cuda.is_available():
        return []
    from roi_ops.dispatch import reasons_against
    from roi_ops.registry import REGISTRY

    probe = roi_ops.RoIPoolProblem(
        torch.empty(1, 1, 1, 1, device="cuda"), torch.zeros(1, 5, device="cuda"), 1, 1, 1.0, True
    )
    names = [e.name for e in REGISTRY.entries() if not reasons_against(e, probe)]
    return [n for n in names if include_torch or n != "torch"]


KERNEL_BACKENDS = _cuda_backends()
ALL_BACKENDS = _cuda_backends(include_torch=True)


def _problem(dtype=torch.float32, channels_last=False, k=64):
    w = WORKLOADS["fpn-p4"]
    x = make_input(w, dtype, "cuda", seed=1, channels_last=channels_last)[:2, :32]
    rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, "cuda", seed=2)[:k]
    rois[:, 0] = rois[:, 0] % 2
    return x, rois, w.spatial_scale


@pytest.fixture(autouse=True)
def _no_stale_errors():
    roi_ops.check_errors()
    yield
    torch.cuda.set_sync_debug_mode(0)
    try:
        roi_ops.check_errors()
    except ValueError:
        pass


@pytest.mark.parametrize("backend", ["auto", *KERNEL_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_default_calls_never_synchronise(backend, dtype, channels_last, call_path):
    x, rois, scale = _problem(dtype, channels_last)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    leaf = x.clone().requires_grad_(True)

    def calls():
        with torch.no_grad():
            roi_ops.roi_pool(x, rois, 7, scale, backend=backend)
        out = roi_ops.roi_pool(leaf, rois, 7, scale, backend=backend)
        out.backward(torch.ones_like(out))
        roi_ops.roi_pool(leaf, per_image, (3, 5), scale, backend=backend).sum().backward()

    calls()  # compiles kernels, creates the bad-ROI log
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_capture_of_a_default_call(backend):
    x, rois, scale = _problem()
    expected = roi_ops.roi_pool(x, rois, 7, scale, backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        roi_ops.roi_pool(x, rois, 7, scale, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = roi_ops.roi_pool(x, rois, 7, scale, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)
    rois[3, 0] = 9.0  # a bad row, seen only by replays
    graph.replay()
    with pytest.raises(ValueError, match=r"row 3 = \[9.0, "):
        roi_ops.check_errors()


def _bad(rois, row, column, value):
    bad = rois.clone()
    bad[row, column] = value
    return bad


HOSTILE = [(0, 2.0), (0, -1.0), (0, 1e30), (0, math.nan), (0, math.inf)] + [
    (column, value) for column in (1, 2, 3, 4) for value in (math.nan, math.inf, -math.inf)
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("column,value", HOSTILE)
def test_bad_rows_raise_later_without_waiting(backend, column, value):
    x, rois, scale = _problem(k=16)
    bad = _bad(rois, 5, column, value)
    bad[9] = bad[5]
    out = roi_ops.roi_pool(x, bad, 3, scale, backend=backend)  # does not raise, does not wait
    torch.cuda.synchronize()
    assert torch.equal(out[5], torch.zeros_like(out[5])) and torch.equal(out[9], out[5])
    good = [i for i in range(16) if i not in (5, 9)]
    assert torch.equal(out[good].cpu(), reference_roi_pool(x.cpu(), rois[good].cpu(), 3, scale)[0])
    with pytest.raises(ValueError, match=r"row 5 = \[.*of an earlier roi_ops call on cuda"):
        roi_ops.roi_pool(x, rois, 3, scale, backend=backend)
    roi_ops.roi_pool(x, rois, 3, scale, backend=backend)  # the record was cleared
    roi_ops.roi_pool(x, bad, 3, scale, backend=backend)
    with pytest.raises(ValueError, match=r"row 5 = "):
        roi_ops.check_errors()
    roi_ops.check_errors()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_rows_raise_at_the_backward_of_that_call(backend):
    x, rois, scale = _problem(k=16)
    leaf = x.clone().requires_grad_(True)
    out = roi_ops.roi_pool(leaf, _bad(rois, 4, 2, math.nan), 3, scale, backend=backend)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"row 4 = \[.*nan"):
        out.sum().backward()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("column,value", HOSTILE[:6])
def test_immediate_mode_raises_at_the_call(backend, column, value):
    x, rois, scale = _problem(k=16)
    with roi_ops.value_checks("immediate"), pytest.raises(ValueError, match=r"row 7 = .*in this"):
        roi_ops.roi_pool(x, _bad(rois, 7, column, value), 3, scale, backend=backend)
    roi_ops.check_errors()  # nothing was recorded for later


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_checks_off_give_zeros_and_no_error(backend):
    x, rois, scale = _problem(k=16)
    with roi_ops.value_checks(False):
        out = roi_ops.roi_pool(x, _bad(rois, 2, 0, 5.0), 3, scale, backend=backend)
    roi_ops.check_errors()
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_the_first_bad_row_wins_among_many(backend):
    x, rois, scale = _problem(k=64)
    bad = rois.clone()
    for row in (50, 11, 33, 12):
        bad[row, 0] = -3.0
    roi_ops.roi_pool(x, bad, 7, scale, backend=backend)
    with pytest.raises(ValueError, match=r"row 11 = \[-3.0, "):
        roi_ops.check_errors()
