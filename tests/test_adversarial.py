"""Adversarial inputs over every backend that runs here, with value checks on and off.

With checks on, a call either matches the reference or raises one of the contract's errors.
With checks off, every call matches the reference (invalid rows give zeros and argmax -1).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import roi_ops
from roi_ops.testing import check_case
from roi_ops.testing.cases import RoiPoolCase

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _runnable(dtype=torch.float32) -> list[str]:
    from roi_ops.dispatch import reasons_against
    from roi_ops.registry import REGISTRY

    probe = roi_ops.RoIPoolProblem(
        torch.empty(1, 1, 1, 1, dtype=dtype, device=DEVICE),
        torch.zeros(1, 5, device=DEVICE, dtype=torch.float32 if dtype == torch.bfloat16 else dtype),
        1,
        1,
        1.0,
        True,
    )
    return [e.name for e in REGISTRY.entries() if not reasons_against(e, probe)]


BACKENDS = _runnable()
HOSTILE = [math.nan, math.inf, -math.inf, 1e30, -1e30, 3e38, -7.0, 0.5, 1e7, -1e7]


@st.composite
def hostile_cases(draw):
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    rois_dtype = (
        torch.float32
        if dtype == torch.bfloat16 or draw(st.booleans()) and dtype in (torch.float16,)
        else dtype
    )
    n = draw(st.integers(0, 3))
    c = draw(st.integers(1, 3))
    h = draw(st.integers(0, 7))
    w = draw(st.integers(0, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**30)))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "expanded", "sliced"]))
    if layout == "expanded":  # zero strides
        x = (torch.randn(1, c, 1, max(w, 1), generator=g)[..., :w]).expand(n, c, h, w)
    elif layout == "sliced":
        x = torch.randn(n, c, h, 2 * w, generator=g)[..., ::2]
    else:
        x = torch.randn(n, c, h, w, generator=g)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    k = draw(st.integers(0, 6))
    rows = []
    for _ in range(k):
        row = [float(draw(st.integers(-2, 4))) + draw(st.sampled_from([0.0, 0.25, 0.5, 0.99]))]
        row += [draw(st.one_of(st.floats(-40, 40), st.sampled_from(HOSTILE))) for _ in range(4)]
        rows.append(row)
    rois = torch.tensor(rows, dtype=torch.float64).reshape(-1, 5).to(rois_dtype)
    big = draw(st.integers(0, 9)) == 0
    size = (draw(st.integers(1, 40 if big else 4)), draw(st.integers(1, 40 if big else 4)))
    scale = draw(st.sampled_from([1.0, 0.5, 1 / 16, 3.0, 1e-3]))
    return RoiPoolCase("hostile", x.to(DEVICE), rois.to(DEVICE), size, scale, needs_unchecked=True)


def _invalid_rows(case: RoiPoolCase) -> bool:
    rois = case.rois_tensor().double().cpu()
    if not len(rois):
        return False
    batch = rois[:, 0].trunc()
    bad = ~torch.isfinite(rois).all(1) | (batch < 0) | (batch >= case.input.shape[0])
    return bool(bad.any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_inputs_with_checks_off_follow_the_contract(backend):
    @settings(
        max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(hostile_cases())
    def run(case):
        check_case(case, backend)

    run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_inputs_with_checks_on_raise_contract_errors(backend):
    @settings(
        max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(hostile_cases())
    def run(case):
        if _invalid_rows(case):
            with pytest.raises(ValueError, match=r"rois: expected a batch index in \[0, N\) and"):
                roi_ops.roi_pool(
                    case.input, case.rois, case.output_size, case.spatial_scale, backend=backend
                )
                roi_ops.check_errors()  # where a CUDA call recorded it without waiting
        else:
            check_case(
                RoiPoolCase(
                    "hostile-valid", case.input, case.rois, case.output_size, case.spatial_scale
                ),
                backend,
            )

    run()


def test_mixed_devices_and_dtypes_are_errors():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(TypeError, match=r"rois: expected dtype float32 \(input is float32\)"):
        roi_ops.roi_pool(x, torch.zeros(1, 5, dtype=torch.float16), 2)
    with pytest.raises(ValueError, match="rois: expected a tensor on input's device"):
        roi_ops.roi_pool(x, torch.zeros(1, 5, device="meta"), 2)
    two = torch.randn(2, 2, 4, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"rois: expected every list entry to have one dtype"):
        roi_ops.roi_pool(two, [torch.zeros(1, 4, dtype=torch.float16), torch.zeros(1, 4)], 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_empty_maps(backend):
    with roi_ops.value_checks(False):
        for shape in [(0, 2, 5, 5), (2, 2, 0, 5), (2, 2, 5, 0)]:
            x = torch.randn(shape, device=DEVICE)
            rois = torch.tensor([[0.0, 0, 0, 3, 3], [1.0, 1, 1, 9, 9]], device=DEVICE)
            out, argmax = roi_ops.roi_pool_with_argmax(x, rois, 3, backend=backend)
            assert torch.equal(out, torch.zeros_like(out))
            assert bool((argmax == -1).all())


def test_threads_get_the_backend_they_ask_for(monkeypatch):
    if len(BACKENDS) < 2:
        pytest.skip("needs two backends")
    from roi_ops.registry import REGISTRY

    monkeypatch.setenv("ROI_OPS_BACKEND", BACKENDS[-1])  # threads without a context use this
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    rois = torch.tensor([[0, 0.0, 0, 6, 6], [1, 2.0, 1, 8, 8]], device=DEVICE)
    expected = roi_ops.roi_pool(x, rois, 3, backend="torch")
    used: dict[int, list[str]] = {}
    originals = {}
    local = threading.local()
    for name in BACKENDS:
        backend = REGISTRY.get(name).backend
        originals[name] = backend.forward

        def spy(problem, output, argmax, _name=name):
            local.used.append(_name)
            return originals[_name](problem, output, argmax)

        monkeypatch.setattr(backend, "forward", spy)
    errors = []

    def worker(index):
        local.used = []
        wanted = BACKENDS[index % len(BACKENDS)] if index % 3 else None
        try:
            for _ in range(20):
                if wanted is None:
                    out = roi_ops.roi_pool(x, rois, 3)
                else:
                    with roi_ops.use_backend(wanted):
                        out = roi_ops.roi_pool(x, rois, 3)
                assert torch.equal(out, expected)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)
        used[index] = (wanted or BACKENDS[-1], list(local.used))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for wanted, seen in used.values():
        assert seen == [wanted] * 20
