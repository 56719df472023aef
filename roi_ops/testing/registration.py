"""Registering a backend for the duration of a test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..backend import Backend
from ..registry import register_backend, unregister_backend


@contextmanager
def registered_backend(backend: Backend | type[Backend]) -> Iterator[Backend]:
    """Register `backend` (a class or an instance) in this process for the body of a ``with``
    block, and unregister it after, even when the body raises; yields the registered instance.

    Its name must not be taken. In a pytest fixture::

        @pytest.fixture
        def fake():
            with registered_backend(FakeBackend) as backend:
                yield backend
    """
    registered = register_backend(backend)
    try:
        yield registered
    finally:
        unregister_backend(registered.name)
