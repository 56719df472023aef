"""A pytest base class that checks any backend against the contract (needs pytest, hypothesis).

A plugin's test suite subclasses it and provides one fixture::

    import pytest
    from roi_ops.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend_name(self):
            return "my-backend"

Every check calls the backend the way users do, through `roi_ops.roi_pool` with
``backend=backend_name`` (forward, inference and the gradient), except the bad-ROI log check,
which calls ``forward`` directly as the core does.

The device is the first device this machine has among those the backend declares (then any
other it accepts); override the `device` fixture to choose another. When the backend is not
registered (a misspelled name, a plugin that is not installed), cannot load or cannot run on any
device here, every test FAILS with the reason, so a plugin's CI never passes while testing
nothing. A suite that runs where the backend may legitimately be missing (a CUDA backend's
tests on a CPU-only runner) sets ``skip_unavailable = True`` to skip instead. A dtype the backend
does not declare is always skipped.
"""

from __future__ import annotations

import difflib
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from .. import bad_rois
from ..backend import Backend, RoIPoolProblem
from ..dispatch import reasons_against
from ..registry import REGISTRY
from .cases import (
    RoiPoolCase,
    check_case,
    contract_cases,
    first_difference,
    nans_with_payloads,
    rois_dtype_for,
)
from .multi_scale import check_multi_scale_case, pyramid_case
from .reference import reference_roi_pool
from .strategies import DTYPES, case_to_device, multi_scale_cases, roi_pool_cases

_DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _probe(device: torch.device, dtype: torch.dtype) -> RoIPoolProblem:
    return RoIPoolProblem(
        torch.empty((1, 1, 1, 1), dtype=dtype, device=device),
        torch.zeros((1, 5), dtype=rois_dtype_for(dtype), device=device),
        1,
        1,
        1.0,
        True,
    )


def _usable_reasons(name: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    entry = REGISTRY.get(name)
    if entry is None:
        return [f"backend {name!r} is not registered (known: {REGISTRY.names()})"]
    return reasons_against(entry, _probe(device, dtype))


def _machine_devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def unusable_reason(name: str) -> tuple[str | None, torch.device | None]:
    """(why backend `name` cannot be tested on this machine, or None; the device to test on).

    The device is the first this machine has among those the backend declares, then any other
    it accepts, for the first dtype it declares.
    """
    entry = REGISTRY.get(name)
    if entry is None:
        known = REGISTRY.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (
            f"backend {name!r} is not registered{hint} (registered: {', '.join(known)}). Is its "
            "plugin installed (e.g. `pip install -e path/to/plugin`) with an entry point in "
            "the 'roi_ops.backends' group?",
            None,
        )
    problem = REGISTRY.availability(entry)
    if problem is not None:
        return f"backend {name!r} cannot run in this process: {problem}", None
    backend = entry.backend
    dtype = next((d for d in DTYPES if d in backend.dtypes), torch.float32)
    devices = _machine_devices()
    declared = [d for d in devices if d.type in backend.device_types or "*" in backend.device_types]
    for device in declared + [d for d in devices if d not in declared]:
        if not _usable_reasons(name, device, dtype):
            return None, device
    reasons = "; ".join(
        f"{device}: {', '.join(_usable_reasons(name, device, dtype))}" for device in devices
    )
    return f"backend {name!r} cannot run on any device of this machine ({reasons})", None


class BackendConformance:
    """Contract conformance tests for the backend named by the `backend_name` fixture.

    Class attributes:
        hypothesis_examples: calls drawn by the differential hypothesis test.
        skip_unavailable: skip (instead of fail) every test when the backend is not registered,
            cannot load, or cannot run on this machine.
    """

    hypothesis_examples: ClassVar[int] = 25
    skip_unavailable: ClassVar[bool] = False

    @pytest.fixture
    def backend_name(self) -> str:
        raise NotImplementedError("subclasses provide a backend_name fixture")

    @pytest.fixture
    def device(self, backend_name: str) -> torch.device:
        reason, device = unusable_reason(backend_name)
        if reason is None:
            return device
        if self.skip_unavailable:
            pytest.skip(reason)
        pytest.fail(
            f"{reason}\n(the conformance kit fails rather than skips here; set "
            "skip_unavailable = True on the test class where the backend may be missing)",
            pytrace=False,
        )

    def _skip_unless_usable(self, backend_name, device, dtype) -> None:
        reasons = _usable_reasons(backend_name, device, dtype)
        if reasons:
            pytest.skip("; ".join(reasons))

    @pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS)
    def test_contract_cases(self, backend_name, device, dtype):
        self._skip_unless_usable(backend_name, device, dtype)
        for case in contract_cases(device, dtype):
            check_case(case, backend_name)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
    def test_float32_rois_with_half_input(self, backend_name, device, dtype):
        self._skip_unless_usable(backend_name, device, dtype)
        for case in contract_cases(device, dtype, seed=3, rois_dtype=torch.float32):
            check_case(case, backend_name)

    @pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS)
    def test_channels_last_and_strided_input(self, backend_name, device, dtype):
        self._skip_unless_usable(backend_name, device, dtype)
        for case in contract_cases(device, dtype, seed=5)[:3]:
            channels_last = case.input.contiguous(memory_format=torch.channels_last)
            check_case(_with_input(case, channels_last), backend_name)
            wide = torch.cat([case.input, case.input + 1], dim=3)
            strided = wide[:, :, :, ::2]  # every other column: not contiguous in any format
            check_case(_with_input(case, strided), backend_name, check_backward=False)

    def test_deterministic_backward(self, backend_name, device):
        self._skip_unless_usable(backend_name, device, torch.float32)
        case = contract_cases(device, torch.float32, seed=7)[0]
        from ..functional import roi_pool

        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            grads = []
            for memory_format in (torch.contiguous_format, torch.channels_last) * 2:
                leaf = case.input.detach().clone(memory_format=memory_format).requires_grad_(True)
                pooled = roi_pool(
                    leaf, case.rois, case.output_size, case.spatial_scale, backend=backend_name
                )
                grad_output = torch.linspace(-1, 1, pooled.numel(), device=device)
                pooled.backward(grad_output.reshape(pooled.shape).to(pooled.dtype) * 1.37)
                grads.append(leaf.grad)
        finally:
            torch.use_deterministic_algorithms(previous)
        for first, second, layout in ((0, 2, "contiguous"), (1, 3, "channels_last")):
            difference = first_difference(grads[second], grads[first], ("n", "c", "h", "w"))
            if difference is not None:
                raise AssertionError(
                    f"{backend_name}: {layout} gradient differs between two runs under "
                    f"torch.use_deterministic_algorithms(True): {difference}"
                )
        assert grads[1].is_contiguous(memory_format=torch.channels_last)

    @pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS)
    def test_bad_roi_log(self, backend_name, device, dtype):
        """A backend that declares ``reports_bad_rois`` records invalid rows in
        ``problem.bad_roi_log`` exactly as `roi_ops.bad_rois.record_bad_rois` does."""
        backend = REGISTRY.get(backend_name).backend
        if not backend.reports_bad_rois:
            pytest.skip(f"{backend_name} does not declare reports_bad_rois")
        self._skip_unless_usable(backend_name, device, dtype)
        for case in bad_roi_cases(device, dtype):
            for log in _logs(device):
                for needs_argmax in (False, True):
                    check_bad_roi_log(backend, case, log, needs_argmax)

    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
    def test_multi_scale_pyramid(self, backend_name, device, channels_last):
        """multi_scale_roi_pool on this backend (fused or level by level) is bit for bit the
        reference of every ROI on its level, forward and gradients."""
        for dtype in _multi_scale_dtypes(backend_name, device):
            case = pyramid_case(device, dtype, seed=3, channels_last=channels_last)
            check_multi_scale_case(case, backend_name)

    def test_multi_scale_hypothesis(self, backend_name, device):
        usable = _multi_scale_dtypes(backend_name, device)
        if not usable:
            pytest.skip("no dtype usable")

        @settings(
            max_examples=max(5, self.hypothesis_examples // 2),
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(multi_scale_cases(dtypes=usable))
        def run(case) -> None:
            check_multi_scale_case(case.to(device), backend_name)

        run()

    def test_hypothesis_differential(self, backend_name, device):
        usable = tuple(d for d in DTYPES if not _usable_reasons(backend_name, device, d))
        if not usable:
            pytest.skip("no dtype usable")

        @settings(
            max_examples=self.hypothesis_examples,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(roi_pool_cases(dtypes=usable))
        def run(case: RoiPoolCase) -> None:
            check_case(case_to_device(case, device), backend_name)

        run()


def _multi_scale_dtypes(backend_name: str, device: torch.device) -> tuple[torch.dtype, ...]:
    return tuple(d for d in DTYPES if not _usable_reasons(backend_name, device, d))


def _with_input(case: RoiPoolCase, input: torch.Tensor) -> RoiPoolCase:
    return RoiPoolCase(
        f"{case.name}-strided",
        input,
        case.rois,
        case.output_size,
        case.spatial_scale,
        case.needs_unchecked,
        case.tags,
    )


def _logs(device: torch.device) -> list[torch.Tensor]:
    """Empty logs of every kind a backend may be handed on `device`."""
    if device.type == "cuda":
        # The core hands CUDA kernels a log in pinned host memory; a device log must work too.
        return [bad_rois.new_log("cpu", pin_memory=True), bad_rois.new_log(device)]
    return [bad_rois.new_log(device)]


def bad_roi_cases(device: torch.device, dtype: torch.dtype) -> list[RoiPoolCase]:
    """Cases for the bad-ROI log: the contract's invalid rows, a first invalid row late in the
    list, each kind of invalid value alone, and rows that are all valid (the log stays empty)."""
    g = torch.Generator().manual_seed(11)
    rdt = rois_dtype_for(dtype)
    x = (torch.randn((3, 2, 6, 7), generator=g, dtype=torch.float64) * 3 + 0.5).to(dtype)
    x = x.to(device)
    nan, inf = float("nan"), float("inf")
    valid = [[0.0, 0, 0, 3, 3], [2.0, 1, 1, 5, 4], [1.7, 1, 0, 6, 5], [-0.5, 2, 2, 4, 4]]
    cases = [c for c in contract_cases(device, dtype) if c.needs_unchecked]
    singles = {
        "batch-index-N": [3.0, 0, 0, 3, 3],
        "batch-index-negative": [-1.0, 0, 0, 3, 3],
        "nan-batch-index": [nan, 0, 0, 3, 3],
        "nan-coordinate": [0.0, 1, nan, 3, 3],
        "inf-coordinate": [2.0, 0, 0, 3, -inf],
    }
    for name, row in singles.items():
        rows = [*valid, row, *valid[:2], [5.0, 0, 0, 1, 1]]  # a later bad row must not win
        rois = torch.tensor(rows, dtype=torch.float64).to(rdt).to(device)
        cases.append(RoiPoolCase(f"bad-roi-{name}", x, rois, (2, 3), 1.0, needs_unchecked=True))
    rois = torch.tensor([*valid, [0.0, 1, 1, 2, 2]], dtype=torch.float64).to(rdt)
    rois[-1] = nans_with_payloads(rdt)  # last: torch's CPU conversions treat tails apart
    cases.append(
        RoiPoolCase("bad-roi-nan-payloads", x, rois.to(device), (2, 3), 1.0, needs_unchecked=True)
    )
    rois = torch.tensor(valid, dtype=torch.float64).to(rdt).to(device)
    cases.append(RoiPoolCase("bad-roi-none", x, rois, 2, 0.5))
    return cases


def _same_bad_roi(found: bad_rois.BadRoi | None, expected: bad_rois.BadRoi | None) -> bool:
    if found is None or expected is None:
        return found is expected
    values_equal = all(
        a == b or (a != a and b != b) for a, b in zip(found.values, expected.values, strict=True)
    )
    return (found.row, found.num_images) == (expected.row, expected.num_images) and values_equal


def check_bad_roi_log(
    backend: Backend, case: RoiPoolCase, log: torch.Tensor, needs_argmax: bool
) -> None:
    """Run ``backend.forward`` on `case` with `log` as ``problem.bad_roi_log`` and assert the log
    decodes to what `roi_ops.bad_rois.record_bad_rois` records for the same rows, and that the
    output (and argmax) match the reference."""
    rois = case.rois_tensor().contiguous()
    num_images = case.input.shape[0]
    pooled_height, pooled_width = (
        (case.output_size, case.output_size)
        if isinstance(case.output_size, int)
        else case.output_size
    )
    problem = RoIPoolProblem(
        case.input, rois, pooled_height, pooled_width, case.spatial_scale, needs_argmax, log
    )
    output = torch.full(problem.output_shape, float("nan"), dtype=case.input.dtype)
    output = output.to(case.input.device)
    argmax = None
    if needs_argmax:
        argmax = torch.full(problem.output_shape, -7, dtype=torch.int32, device=output.device)
    log.fill_(bad_rois.EMPTY)
    with torch.no_grad():
        backend.forward(problem, output, argmax)
    if output.device.type == "cuda":
        torch.cuda.synchronize(output.device)
    expected_log = bad_rois.new_log("cpu")
    bad_rois.record_bad_rois(expected_log, rois.cpu(), num_images)
    found, expected = bad_rois.decode(log.cpu()), bad_rois.decode(expected_log)
    where = f"{backend.name}: {case!r}, {'device' if log.is_cuda else 'host'} log"
    if not _same_bad_roi(found, expected):
        raise AssertionError(
            f"{where}: bad-ROI log decodes to {found}, expected {expected} (the first invalid "
            "row, as roi_ops.bad_rois.record_bad_rois records it)"
        )
    reference, reference_argmax = reference_roi_pool(
        case.input, rois, case.output_size, case.spatial_scale
    )
    difference = first_difference(output, reference)
    if difference is not None:
        raise AssertionError(f"{where}: forward output differs from the reference: {difference}")
    if argmax is not None:
        difference = first_difference(argmax.cpu(), reference_argmax)
        if difference is not None:
            raise AssertionError(f"{where}: argmax differs from the reference: {difference}")
