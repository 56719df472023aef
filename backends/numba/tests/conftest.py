"""Fixtures of the numba backend's tests: every test that takes `backend` runs with its calls all
serial and again all parallel (`schedule`)."""

from __future__ import annotations

import pytest
from numba_cases import SCHEDULES, make_backend


@pytest.fixture(params=list(SCHEDULES))
def schedule(request) -> str:
    """Which kernels every call takes: "serial" or "parallel"."""
    return request.param


@pytest.fixture
def backend(schedule):
    """A NumbaBackend whose calls all take `schedule`'s kernels."""
    return make_backend(schedule)
