"""A pytest base class that checks any backend against the contract (needs pytest, hypothesis).

A plugin's test suite subclasses it and provides one fixture::

    import pytest
    from roi_ops.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend_name(self):
            return "my-backend"

The device is the first of cpu/cuda that the backend supports and this machine has; override the
`device` fixture to choose another. Tests skip when the backend is unavailable.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from ..backend import RoIPoolProblem
from ..dispatch import reasons_against
from ..registry import REGISTRY
from .cases import RoiPoolCase, check_case, contract_cases
from .strategies import DTYPES, case_to_device, roi_pool_cases

_DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _usable_reasons(name: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    entry = REGISTRY.get(name)
    if entry is None:
        return [f"backend {name!r} is not registered (known: {REGISTRY.names()})"]
    probe = RoIPoolProblem(
        torch.empty((1, 1, 1, 1), dtype=dtype, device=device),
        torch.zeros(
            (1, 5), dtype=torch.float32 if dtype == torch.bfloat16 else dtype, device=device
        ),
        1,
        1,
        1.0,
        True,
    )
    return reasons_against(entry, probe)


class BackendConformance:
    """Contract conformance tests for the backend named by the `backend_name` fixture."""

    hypothesis_examples = 25

    @pytest.fixture
    def backend_name(self) -> str:
        raise NotImplementedError("subclasses provide a backend_name fixture")

    @pytest.fixture
    def device(self, backend_name: str) -> torch.device:
        entry = REGISTRY.get(backend_name)
        if entry is None or entry.backend is None and REGISTRY.availability(entry):
            pytest.skip(f"backend {backend_name!r} is not available")
        candidates = [torch.device("cpu")]
        if torch.cuda.is_available():
            candidates.append(torch.device("cuda"))
        for device in candidates:
            if not _usable_reasons(backend_name, device, torch.float32):
                return device
        reasons = _usable_reasons(backend_name, candidates[-1], torch.float32)
        pytest.skip(f"backend {backend_name!r} cannot run here: {'; '.join(reasons)}")

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
        assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3])
        assert grads[1].is_contiguous(memory_format=torch.channels_last)

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
