"""What the CuPy backend's kernel tests share: poisoned and guarded buffers, inputs placed in
every layout, a runner for launch plans (the CPU emulator, or CuPy on a CUDA device), and bit
comparisons against the scalar reference."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from roi_ops.backend import RoIPoolProblem
from roi_ops.device_info import CudaSizes
from roi_ops.testing import check_with_and_without_argmax
from roi_ops.testing.reference import reference_roi_pool

from roi_ops_cupy import kernels, planning
from roi_ops_cupy.tuning import DEFAULT_TUNING, CupyTuning

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = ["float16", "bfloat16", "float32", "float64"]
# Each layout takes another kernel (forced where it can run): contiguous the small kernel, or as
# "contiguous_unit" the unit kernel; channels_last (16-byte aligned channel vectors) the
# small_cvec kernel, or as "channels_last_cvec" the cvec kernel, as "channels_last_cvec_wide" its
# wide twin, each with "_tables" reading tables of maxima in inference (built from the input
# first, every entry poisoned before); shifted by one element the chan kernel; strided the plane
# kernel.
LAYOUTS = [
    "contiguous",
    "channels_last",
    "channels_last_unaligned",
    "strided",
    "contiguous_unit",
    "channels_last_cvec",
    "channels_last_cvec_wide",
    "channels_last_cvec_tables",
    "channels_last_cvec_wide_tables",
]
# The layouts of the kernels that read channel blocks or rows of bins in rounds.
BLOCK_LAYOUTS = [layout for layout in LAYOUTS if layout != "strided"]
_LAYOUT_KERNELS = {
    "contiguous": kernels.FORWARD_SMALL,
    "contiguous_unit": kernels.FORWARD_UNIT,
    "channels_last": kernels.FORWARD_SMALL_CVEC,
    "channels_last_cvec": kernels.FORWARD_CVEC,
    "channels_last_cvec_wide": kernels.FORWARD_CVEC_WIDE,
    "channels_last_cvec_tables": kernels.FORWARD_CVEC,
    "channels_last_cvec_wide_tables": kernels.FORWARD_CVEC_WIDE,
}
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
GUARD = 64  # elements of sentinel before and after every buffer a kernel touches
HAS_CUDA = torch.cuda.is_available()
# The marks of a test module that runs only on a CUDA device.
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def sizes(multiprocessors: int = 1, l2_bytes: int = 0, shared: int = 227 * 1024) -> CudaSizes:
    """A device's sizes for planning without a device."""
    return CudaSizes(multiprocessors, l2_bytes, shared)


def rois_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The rois dtype tests pair with input `dtype` (float32 for bfloat16)."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def guarded(shape, strides, dtype, device, fill, shift=0):
    """A view with the given strides inside a buffer whose other elements are `fill`, starting
    `shift` elements after the guard (GUARD elements: 16-byte aligned)."""
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) if all(shape) else 0
    buffer = torch.full((extent + 2 * GUARD + shift,), fill, dtype=dtype, device=device)
    return buffer.as_strided(shape, strides, GUARD + shift), buffer


def place_input(x: torch.Tensor, layout: str, device) -> torch.Tensor:
    """`x` copied onto `device` in `layout`, every element around it NaN (so a stray read shows)."""
    if layout.startswith("channels_last_cvec"):
        layout = "channels_last"
    layout = {"contiguous_unit": "contiguous"}.get(layout, layout)
    if layout == "strided":  # every other column of a wider map: contiguous in no format
        n, c, h, w = x.shape
        view, _ = guarded(
            (n, c, h, 2 * w), (c * h * 2 * w, h * 2 * w, 2 * w, 1), x.dtype, device, math.nan
        )
        view = view[..., 1::2]
    else:
        last = layout.startswith("channels_last")
        fmt = torch.channels_last if last else torch.contiguous_format
        strides = torch.empty(x.shape, device="meta").contiguous(memory_format=fmt).stride()
        shift = 1 if layout == "channels_last_unaligned" else 0
        view, _ = guarded(tuple(x.shape), strides, x.dtype, device, math.nan, shift)
    view.copy_(x)
    return view


def contiguous_strides(shape) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def poisoned_outputs(shape, dtype, device, needs_argmax, shift=0):
    """Poisoned outputs (NaN, -7) inside guard buffers of -7, starting `shift` elements after a
    16-byte boundary; returns views and buffers."""
    strides = contiguous_strides(shape)
    output, out_buf = guarded(shape, strides, dtype, device, -7.0, shift)
    output.fill_(math.nan)
    argmax, arg_buf = guarded(shape, strides, torch.int32, device, -7, shift)
    return output, out_buf, (argmax if needs_argmax else None), arg_buf


def check_guards(buffer: torch.Tensor, fill: float) -> None:
    guard = torch.cat([buffer[:GUARD], buffer[-GUARD:]]).cpu()
    assert bool((guard == fill).all()), "a kernel wrote outside its output"


class CudaRunner:
    """Launch plans run through CuPy on the current CUDA device."""

    device = torch.device("cuda")

    def launch(self, launch: kernels.Launch) -> None:
        from roi_ops_cupy import launch as cupy_launch

        cupy_launch.run(torch.cuda.current_device(), launch)
        torch.cuda.synchronize()


def build_tables(runner, problem: RoIPoolProblem, tuning: CupyTuning = DEFAULT_TUNING):
    """The tables of maxima of `problem`'s input (dense channels_last) as the launcher queues
    them: the count of saved reads into poisoned decision bytes, then the decision (forced yes
    unless `tuning` says otherwise) and the build into a poisoned (NaN) buffer inside a guard;
    returns (tables, decision) on the runner's device."""
    x = problem.input
    device = runner.device
    decision = torch.full((planning.TABLE_HEAD_BYTES // 4,), -7, dtype=torch.int32, device=device)
    tables, buffer = guarded((2 * x.numel(),), (1,), x.dtype, device, -7.0)
    tables.fill_(math.nan)
    runner.launch(planning.plan_table_savings(problem, decision))
    # One SM: a grid of TABLE_BLOCKS_PER_SM blocks, whose threads stride over the work.
    runner.launch(planning.plan_max_tables(problem, decision, tables, sizes(), tuning))
    check_guards(buffer, -7.0)
    return tables, decision


def run_forward(
    runner,
    x,
    rois,
    size,
    scale,
    *,
    layout="contiguous",
    needs_argmax=True,
    multiprocessors=1,
    l2_bytes=0,
    grid_y=None,
    tuning: CupyTuning = DEFAULT_TUNING,
    bad_roi_log=None,
    output_shift=0,
):
    """The kernels on poisoned outputs (`output_shift` elements past a 16-byte boundary),
    planned for a device of `multiprocessors` SMs and `l2_bytes` of L2; returns CPU (output,
    argmax or None)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if layout in _LAYOUT_KERNELS and tuning.forward_kernel is None:
        tuning = replace(tuning, forward_kernel=_LAYOUT_KERNELS[layout])
    device = runner.device
    placed = place_input(x, layout, device)
    rois = rois.to(device)
    problem = RoIPoolProblem(
        placed, rois, size[0], size[1], scale, needs_argmax, bad_roi_log=bad_roi_log
    )
    output, out_buf, argmax, arg_buf = poisoned_outputs(
        problem.output_shape, x.dtype, device, needs_argmax, output_shift
    )
    tables = decision = None
    if layout.endswith("_tables") and not needs_argmax and x.dtype in kernels.TABLE_DTYPES:
        tables, decision = build_tables(runner, problem, replace(tuning, max_tables=True))
        assert int(decision[0]) == 1
    launch = planning.plan_forward(
        problem, output, argmax, sizes(multiprocessors, l2_bytes), tuning, tables, decision
    )
    if launch is not None:
        if grid_y is not None:  # fewer block rows than channel blocks: the kernels loop
            launch = kernels.Launch(
                launch.name, (launch.grid[0], grid_y, 1), launch.block, launch.shared_mem,
                launch.args,
            )  # fmt: skip
        runner.launch(launch)
    check_guards(out_buf, -7.0)
    check_guards(arg_buf, -7)
    return output.cpu(), (argmax.cpu() if needs_argmax else None)


def check(runner, x, rois, size, scale, **options) -> None:
    """Both modes (with and without argmax) bit for bit against the scalar reference."""
    check_with_and_without_argmax(
        lambda needs_argmax: run_forward(
            runner, x, rois, size, scale, needs_argmax=needs_argmax, **options
        ),
        *reference_roi_pool(x, rois, size, scale),
    )


def wide(x: torch.Tensor, channels: int = 24) -> torch.Tensor:
    """`x` with at least `channels` channels (shifted copies), so channels_last takes a
    channel-lane kernel (24: whole vectors of every dtype for the cvec kernel); NaN,
    infinities and ties survive."""
    copies = math.ceil(channels / x.shape[1])
    return torch.cat([x + i for i in range(copies)], dim=1)
