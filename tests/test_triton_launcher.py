"""`roi_ops_triton.launcher`: which launches reuse a compiled kernel, with a stand-in kernel.

The stand-in records how it was launched, so these run without Triton compiling anything; the
Triton backend's GPU tests run the real kernels through the launcher.
"""

from __future__ import annotations

import pytest
import torch

launcher = pytest.importorskip("roi_ops_triton.launcher")


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
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(launcher, "enabled", True)
    launcher.clear()
    yield
    launcher.clear()


def _routes(kernel):
    return [entry[0] for entry in kernel.log]


META = {"BLOCK": 64, "FLAG": True, "num_warps": 4, "enable_fp_fusion": False}


def test_a_repeat_launch_goes_straight_to_the_compiled_kernel():
    kernel = _Kernel()
    x = torch.zeros(64)
    launcher.launch(kernel, (3, 2), (x, 100, 0.5), META, 0)
    launcher.launch(kernel, (5, 1), (x, 200, 0.25), META, 0)
    assert _routes(kernel) == ["triton", "direct"]
    _, grid, args = kernel.log[1]
    assert grid == (5, 1, 1)
    # every parameter in signature order: the positional ones, then the constexprs from meta
    assert args[0] is x and args[1:] == (200, 0.25, 64, True)


@pytest.mark.parametrize(
    "changed",
    [
        "dtype",
        "alignment",
        "int64",
        "multiple_of_16",
        "one",
        "constexpr",
        "option",
        "device",
        "kernel",
    ],
)
def test_anything_triton_may_specialise_on_binds_again(changed):
    kernel = _Kernel()
    x = torch.zeros(64)
    base = ((x, 100, 0.5), dict(META), 0)
    launcher.launch(kernel, (1, 1), *base)
    args, meta, device = (x, 100, 0.5), dict(META), 0
    if changed == "dtype":
        args = (x.double(), 100, 0.5)
    elif changed == "alignment":
        args = (x[1:], 100, 0.5)  # 4 bytes past a 16-byte boundary
    elif changed == "int64":
        args = (x, 2**31, 0.5)
    elif changed == "multiple_of_16":
        args = (x, 96, 0.5)
    elif changed == "one":
        args = (x, 1, 0.5)
    elif changed == "constexpr":
        meta["BLOCK"] = 128
    elif changed == "option":
        meta["num_warps"] = 8
    elif changed == "device":
        device = 1
    other = _Kernel() if changed == "kernel" else kernel
    launcher.launch(other, (1, 1), args, meta, device)
    assert _routes(other)[-1] == "triton"
    launcher.launch(other, (1, 1), args, meta, device)  # and that key is cached in turn
    assert _routes(other)[-1] == "direct"


def test_unkeyable_arguments_always_bind():
    kernel = _Kernel()
    for _ in range(2):
        launcher.launch(kernel, (1, 1), (torch.zeros(4), "text", 0.5), META, 0)
    assert _routes(kernel) == ["triton", "triton"]


def test_a_kernel_without_a_grid_runner_always_binds():
    kernel = _Kernel(compiled_type=lambda log: None)  # what the interpreter returns
    for _ in range(3):
        launcher.launch(kernel, (1, 1), (torch.zeros(4), 3, 0.5), META, -1)
    assert _routes(kernel) == ["triton"] * 3


def test_a_parameter_left_to_its_default_always_binds():
    kernel = _Kernel()
    meta = {"BLOCK": 64, "num_warps": 4}  # FLAG missing: its value is not known here
    for _ in range(2):
        launcher.launch(kernel, (1, 1), (torch.zeros(4), 3, 0.5), meta, 0)
    assert _routes(kernel) == ["triton", "triton"]


def test_disabled_always_binds(monkeypatch):
    monkeypatch.setattr(launcher, "enabled", False)
    kernel = _Kernel()
    for _ in range(2):
        launcher.launch(kernel, (1, 1), (torch.zeros(4), 3, 0.5), META, 0)
    assert _routes(kernel) == ["triton", "triton"]
