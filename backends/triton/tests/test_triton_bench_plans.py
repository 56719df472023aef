"""The default tuning's launches for the bench workloads, pinned to those of the single-file
kernels this package replaced (b875d4c), on an H200's sizes: grids, warps, block sizes, channels
per program and every constexpr. Launches are recorded, not run; tensors are on the meta device.

``python backends/triton/tools/compare_old.py launch`` compares the same launches with the old
host code itself (read from git); these tables are its output, written down so that the check
needs no git history.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem
from roi_ops.bench.workloads import WORKLOADS, make_rois

pytest.importorskip("triton")

from roi_ops_triton import launch  # noqa: E402

H200 = (132, 60 * 2**20)  # (SMs, L2 bytes)
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class Plans(NamedTuple):
    """A workload's launches, each a pair of numbers."""

    # NCHW, the unit kernel (256 lanes, 4 channels per lane, 8 warps): (blocks, channels per
    # program).
    unit: tuple[int, int]
    # channels_last (4 warps, BLOCK_C of 128 bytes, 16-byte vectors): (blocks for 2-byte
    # elements, BLOCK_B); blocks double with each doubling of the element size.
    channels_last: tuple[int, int]
    # The backward scatter (4 warps), every dtype and layout: (blocks, BLOCK).
    backward: tuple[int, int]


PLANS = {
    "frcnn-c4": Plans(unit=(7, 160), channels_last=(16, 64), backward=(25, 2048)),
    "fpn-p2": Plans(unit=(13, 20), channels_last=(4, 64), backward=(25, 512)),
    "fpn-p4": Plans(unit=(2, 160), channels_last=(4, 64), backward=(7, 2048)),
    "mask-14": Plans(unit=(7, 40), channels_last=(16, 64), backward=(25, 2048)),
    "big-batch": Plans(unit=(13, 20), channels_last=(4, 64), backward=(25, 512)),
    "wsddn": Plans(unit=(4, 160), channels_last=(8, 64), backward=(13, 2048)),
    "many-small": Plans(unit=(1, 112), channels_last=(1, 16), backward=(1, 2048)),
}


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, grid, arguments by name) of every launch, on an H200's sizes."""
    recorded = []

    def record(kernel, grid, args, meta, key):
        recorded.append(
            (kernel.__name__, grid, {**dict(zip(kernel.arg_names, args, strict=False)), **meta})
        )

    monkeypatch.setattr(launch.launch_cache, "launch", record)
    monkeypatch.setattr(launch, "device_sizes", lambda index: H200)
    return recorded


def _meta(shape, dtype, channels_last=False):
    tensor = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("needs_argmax", [True, False], ids=["argmax", "inference"])
def test_bench_workload_launches_are_the_old_ones(
    launches, workload, dtype_name, layout, needs_argmax
):
    w = WORKLOADS[workload]
    dtype = DTYPES[dtype_name]
    channels_last = layout == "channels_last"
    x = _meta((w.num_images, w.channels, w.height, w.width), dtype, channels_last)
    rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, "cpu")
    k, size = rois.shape[0], w.output_size
    out = _meta((k, w.channels, size, size), dtype)
    arg = _meta((k, w.channels, size, size), torch.int32) if needs_argmax else None
    runner = launch.Runner()
    runner.forward(RoIPoolProblem(x, rois, size, size, w.spatial_scale, needs_argmax), out, arg)

    (name, grid, args), *rest = launches
    assert rest == []
    common = {
        "GEOM_HALF": dtype == torch.float16,
        "GEOM_F64": dtype == torch.float64,
        "ACC_F64": dtype == torch.float64,
        "NEEDS_ARGMAX": needs_argmax,
        "REPORT_BAD": False,
        "enable_fp_fusion": False,
    }
    shapes = dict(zip(("N", "C", "H", "W"), x.shape, strict=True)) | dict(PH=size, PW=size)
    shapes |= dict(zip(("s_n", "s_c", "s_h", "s_w"), x.stride(), strict=True)) | {"blk_offset": 0}
    if channels_last:
        blocks, block_b = PLANS[workload].channels_last
        element = x.element_size()
        expected = common | {
            "BLOCK_C": 128 // element, "BLOCK_B": block_b, "VEC": 16 // element,
            "EVEN_C": True, "C_UNIT": True, "num_warps": 4,
        }  # fmt: skip
        assert name == "roi_pool_forward_channels_last"
        assert grid == (k, blocks * element // 2)
    else:
        blocks, per_program = PLANS[workload].unit
        expected = common | {"LANES": 256, "CHANNELS": 4, "num_warps": 8}
        expected["chan_per_prog"] = per_program
        assert name == "roi_pool_forward_unit"
        assert grid == (k, blocks)
    assert {key: args[key] for key in expected} == expected
    assert {key: args[key] for key in shapes} == shapes

    if needs_argmax:
        grad = _meta((k, w.channels, size, size), dtype)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        runner.backward(
            RoIPoolBackwardProblem(grad, arg, rois, tuple(x.shape), dtype, memory_format)
        )
        name, grid, args = launches[1]
        blocks, block = PLANS[workload].backward
        assert name == "roi_pool_backward_scatter" and grid == (k, blocks)
        assert args["BLOCK"] == block and args["num_warps"] == 4
        assert args["ACC_F64"] == (dtype == torch.float64)
