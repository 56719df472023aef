"""Load for the timing tools: processes that keep cores busy, as another program would."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def busy_cores(count: int) -> Iterator[list[subprocess.Popen]]:
    """Start `count` processes that each keep a core busy (``while True: pass``) for the body of
    the ``with`` block, and stop them after it; yields the processes."""
    processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.wait()
