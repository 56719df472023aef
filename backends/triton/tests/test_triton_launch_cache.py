"""`roi_ops_triton.launch_cache`: which launches reuse a compiled kernel, with a stand-in kernel.

The stand-in records how it was launched, so these run without Triton compiling anything;
test_triton_launch.py checks the keys the host side builds, and the GPU tests run the real
kernels through the cache.
"""

from __future__ import annotations

import pytest
import torch

from roi_ops_triton import launch_cache


class _Compiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def runner(*args):
            self.log.append(("direct", grid, args))

        return runner


class _Kernel:
    """Stands in for a JITFunction with parameters (x_ptr, n, scale, BLOCK, FLAG)."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self, compiled_type=_Compiled):
        self.log = []
        self.compiled_type = compiled_type

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("triton", grid, args, meta))
            return self.compiled_type(self.log)

        return run


@pytest.fixture(autouse=True)
def _fresh_cache():
    launch_cache.clear()
    yield
    launch_cache.clear()


def _routes(kernel):
    return [entry[0] for entry in kernel.log]


META = {"BLOCK": 64, "FLAG": True, "num_warps": 4, "enable_fp_fusion": False}


def test_a_repeat_launch_goes_straight_to_the_compiled_kernel():
    kernel = _Kernel()
    x = torch.zeros(64)
    launch_cache.launch(kernel, (3, 2), (x, 100, 0.5), META, "key")
    launch_cache.launch(kernel, (5, 1), (x, 200, 0.25), META, "key")
    assert _routes(kernel) == ["triton", "direct"]
    _, grid, args = kernel.log[1]
    assert grid == (5, 1, 1)
    # every parameter in signature order: the positional ones, then the constexprs from meta
    assert args[0] is x and args[1:] == (200, 0.25, 64, True)


def test_another_key_binds_again_and_is_cached_in_turn():
    kernel = _Kernel()
    x = torch.zeros(64)
    launch_cache.launch(kernel, (1, 1), (x, 1, 0.5), META, "a")
    launch_cache.launch(kernel, (1, 1), (x, 1, 0.5), META, "b")
    launch_cache.launch(kernel, (1, 1), (x, 1, 0.5), META, "b")
    launch_cache.launch(kernel, (1, 1), (x, 1, 0.5), META, "a")
    assert _routes(kernel) == ["triton", "triton", "direct", "direct"]


def test_a_kernel_without_a_grid_runner_always_binds():
    kernel = _Kernel(compiled_type=lambda log: None)  # what the interpreter returns
    for _ in range(3):
        launch_cache.launch(kernel, (1, 1), (torch.zeros(4), 3, 0.5), META, "key")
    assert _routes(kernel) == ["triton"] * 3


def test_a_parameter_left_to_its_default_always_binds():
    kernel = _Kernel()
    meta = {"BLOCK": 64, "num_warps": 4}  # FLAG missing: its value is not known here
    for _ in range(2):
        launch_cache.launch(kernel, (1, 1), (torch.zeros(4), 3, 0.5), meta, "key")
    assert _routes(kernel) == ["triton", "triton"]


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(launch_cache, "_MAX_CACHED", 2)
    kernel = _Kernel()
    for key in ("a", "b", "c", "a"):
        launch_cache.launch(kernel, (1, 1), (torch.zeros(4), 3, 0.5), META, key)
    assert _routes(kernel) == ["triton"] * 4  # "c" cleared the cache
