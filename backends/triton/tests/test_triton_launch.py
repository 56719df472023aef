"""The host side (`roi_ops_triton.launch`): a call shape is planned once, and the launch cache
key changes with everything Triton specialises on. Launches are recorded, not run."""

from __future__ import annotations

import types

import pytest
import torch

from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem

pytest.importorskip("triton")

from roi_ops_triton import launch  # noqa: E402
from roi_ops_triton.tuning import Tuning  # noqa: E402


@pytest.fixture
def launches(monkeypatch):
    """The (kernel name, grid, args, key) of every launch, instead of running them."""
    recorded = []

    def record(kernel, grid, args, meta, key):
        recorded.append((kernel.__name__, grid, args, key))

    monkeypatch.setattr(launch.launch_cache, "launch", record)
    return recorded


def _forward(runner, x, rois, size=(2, 2), scale=0.5, argmax=True, log=None, output=None):
    problem = RoIPoolProblem(x, rois, size[0], size[1], scale, argmax, log)
    if output is None:
        output = torch.empty(problem.output_shape, dtype=x.dtype)
    index = torch.empty(problem.output_shape, dtype=torch.int32) if argmax else None
    runner.forward(problem, output, index)


def _rois(count, dtype=torch.float32):
    return torch.tensor([[0.0, 1, 1, 5, 5]] * count, dtype=dtype)


def test_a_call_shape_is_planned_once(launches):
    runner = launch.Runner()
    x = torch.randn(2, 8, 6, 7)
    for count in (3, 3, 500):  # K is the grid, not part of the plan
        _forward(runner, x, _rois(count))
    assert len(runner._forward_plans) == 1
    keys = [key for *_, key in launches]
    assert keys[0] == keys[1] and keys[0][0] is keys[2][0]


def _aligned_view(x: torch.Tensor) -> torch.Tensor:
    """`x`'s values at an address 4 bytes past a 16-byte boundary."""
    buffer = torch.empty(x.numel() + 1, dtype=x.dtype)
    view = buffer[1:].view(x.shape)
    view.copy_(x)
    return view


@pytest.mark.parametrize(
    "change",
    [
        "input dtype", "rois dtype", "input alignment", "rois alignment", "output alignment",
        "shape", "strides", "rois strides", "output size", "scale", "no argmax", "a log",
        "tuning",
    ],
)  # fmt: skip
def test_what_triton_specialises_on_changes_the_key(launches, change):
    base = launch.Runner()
    x = torch.randn(2, 8, 6, 7)
    rois = _rois(3)
    _forward(base, x, rois)
    runner, kwargs = base, {}
    if change == "input dtype":
        x = x.double()
        rois = rois.double()
        kwargs["output"] = torch.empty(3, 8, 2, 2, dtype=torch.float64)
    elif change == "rois dtype":
        x, rois = x.half(), rois.half()
        _forward(base, x, rois.float())  # float32 rois with float16 input, first
    elif change == "input alignment":
        x = _aligned_view(x)
    elif change == "rois alignment":
        rois = _aligned_view(rois)
    elif change == "output alignment":
        kwargs["output"] = _aligned_view(torch.empty(3, 8, 2, 2))
    elif change == "shape":
        x = torch.randn(2, 8, 6, 9)
    elif change == "strides":
        x = x.contiguous(memory_format=torch.channels_last)
    elif change == "rois strides":
        rois = torch.cat([rois, rois], 1)[:, :5]
    elif change == "output size":
        kwargs["size"] = (3, 1)
    elif change == "scale":
        kwargs["scale"] = 0.25
    elif change == "no argmax":
        kwargs["argmax"] = False
    elif change == "a log":
        kwargs["log"] = torch.zeros(12, dtype=torch.int64)
    elif change == "tuning":
        runner = launch.Runner(Tuning(unit_lanes=128))
    if "output" in kwargs and x.dtype != kwargs["output"].dtype:
        kwargs["output"] = kwargs["output"].to(x.dtype)
    before = len(launches)
    _forward(runner, x, rois, **kwargs)
    new_key = launches[-1][3]
    assert all(new_key != key for *_, key in launches[:before])


def test_the_unit_kernel_sizes_its_programs_by_k(launches):
    """Few ROIs split the channels over more programs (channels per program in the key)."""
    runner = launch.Runner(Tuning(unit_lanes=16))  # rounds of 16 channels for 4 bins
    x = torch.randn(1, 256, 6, 7)
    _forward(runner, x, _rois(2))
    _forward(runner, x, _rois(4000))
    (_, few_grid, few_args, few_key), (_, many_grid, many_args, many_key) = launches
    assert few_grid[1] > many_grid[1] and few_args[-1] < many_args[-1]
    assert few_key[0] is many_key[0] and few_key != many_key


def test_the_grid_is_split_into_launches_of_max_grid_y_blocks(launches, monkeypatch):
    monkeypatch.setattr(launch, "MAX_GRID_Y", 3)
    runner = launch.Runner(Tuning(kernel="flat", flat_lanes=16))
    _forward(runner, torch.randn(1, 10, 6, 7), _rois(5))  # 10 * 4 outputs: 3 blocks of 16
    _forward(runner, torch.randn(1, 30, 6, 7), _rois(5))  # 120 outputs: 8 blocks
    grids = [grid for _, grid, _, _ in launches]
    starts = [args[19] for _, _, args, _ in launches]  # blk_offset follows scale_bits
    assert grids == [(5, 3), (5, 3), (5, 3), (5, 2)]
    assert starts == [0, 0, 3, 6]


def test_a_backward_shape_is_planned_once(launches):
    runner = launch.Runner()
    argmax = torch.zeros(3, 8, 2, 2, dtype=torch.int32)
    for _ in range(2):
        problem = RoIPoolBackwardProblem(
            torch.ones(3, 8, 2, 2), argmax, _rois(3), (2, 8, 6, 7), torch.float16
        )
        grad = runner.backward(problem)
        assert grad.dtype == torch.float16 and grad.shape == (2, 8, 6, 7)
    assert len(runner._backward_plans) == 1 and len(launches) == 2
    assert launches[0][3] == launches[1][3]
    assert launches[0][0] == "roi_pool_backward_scatter"


def test_a_pinned_log_is_passed_by_address_to_cuda_kernels():
    """A log in (pinned) host memory, for a kernel on CUDA: what Triton needs of a pointer
    argument, its address and dtype, without the tensor's CPU device."""
    log = torch.zeros(12, dtype=torch.int64)
    on_cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    argument = launch.log_argument(log, on_cuda)
    assert not isinstance(argument, torch.Tensor)
    assert argument.data_ptr() == log.data_ptr() and argument.dtype == torch.int64
    assert launch.log_argument(log, torch.zeros(1)) is log  # the interpreter takes the tensor
