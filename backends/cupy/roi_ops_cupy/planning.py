"""Launch planning: which kernel a call runs, and its grid, block, shared memory and arguments.

Imports no CuPy. Every function is pure: it reads shapes, strides, dtypes and the device's sizes
(`roi_ops.device_info.CudaSizes`), never tensor values and never the environment; the tuning
constants come in as a `CupyTuning`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from roi_ops.backend import MultiScaleRoIPoolProblem, RoIPoolProblem, accumulate_dtype
from roi_ops.device_info import CudaSizes
from roi_ops.layout import aligned_channel_vector

from . import kernels
from .kernels import Launch, integer, pointer, real
from .tuning import DEFAULT_TUNING, CupyTuning

THREADS = 256  # the forward kernels' largest block (kThreads in cuda/common.cuh)
CHAN_LANES = 32  # channels per block of the chan kernel (kChanLanes)
UNIT_CHANNELS = 4  # channels per thread and step of the unit kernel (kUnitChannels)
CVEC_BYTES = 16  # the cvec kernel loads 16 aligned bytes of channels at a time
CVEC_THREADS = 8  # most threads per bin in a block of the cvec kernel (kCvecThreads)
CVEC_TILE_BYTES = 32768  # the cvec kernel's tile of one round's outputs (kCvecTileBytes)
CVEC_BLOCKS_PER_SM = 4  # the cvec kernels' launch bounds (kCvecBlocksPerSM)
# A cvec block's shared memory besides its tile: its bin edges (1 KiB), and the 1 KiB the
# device reserves for each block.
CVEC_OTHER_SHARED = 2048
# The forward kernels count a block's channels in 32-bit integers (a few thousand in practice).
MAX_CHANNELS_PER_BLOCK = 2**24
SMALL_BIN_BYTES = 24  # one (ROI, bin) entry of the small kernels' table (SmallBin)
SMALL_MAX_SHARED = 48 * 1024  # the small kernels' table (and tile) per block, at most
PLANES_STATIC_SHARED = 5 * 1024  # the planes kernel's own __shared__ arrays (4224 B), and room
DEFAULT_SHARED_LIMIT = 48 * 1024  # what every CUDA device gives a block without opting in
MAX_GRID_Y = 65535
INT32_LIMIT = 2**31
TABLE_BLOCKS_PER_SM = 3  # the tables' build: its blocks an SM (kTableBlocksPerSM), all resident
# The tables' buffer starts with the decision's bytes: its int32, then from byte 16 a long long
# count for each block of the count of saved reads (cuda/max_tables.cu).
TABLE_HEAD_BYTES = CVEC_BYTES + 8 * kernels.TABLE_SAVINGS_BLOCKS
UNIT_GEOMETRY_BYTES = 16  # the unit kernel's shared ROI geometry (UnitGeometry) before its edges
# The unit kernel's PH + PW edges fit the shared memory every device gives a block, since PH + PW
# <= PH * PW + 1.
UNIT_MAX_BINS = (DEFAULT_SHARED_LIMIT - UNIT_GEOMETRY_BYTES) // 8 - 1


def unsupported_reasons(problem: RoIPoolProblem) -> list[str]:
    """Size and dtype limits of these kernels (beyond what roi_ops validates)."""
    return _limits(
        problem.input.dtype,
        problem.rois.dtype,
        problem.pooled_height * problem.pooled_width,
        problem.num_rois,
    )


def multi_scale_unsupported_reasons(problem: MultiScaleRoIPoolProblem) -> list[str]:
    """Why the fused multi-level kernels cannot run `problem` (empty: they can): more levels
    than their table holds, and the single-level kernels' dtype and size limits."""
    reasons = []
    if problem.num_levels > kernels.MAX_LEVELS:
        reasons.append(
            f"{problem.num_levels} pyramid levels (the fused kernels take at most "
            f"{kernels.MAX_LEVELS})"
        )
    bins = problem.pooled_height * problem.pooled_width
    return reasons + _limits(problem.dtype, problem.rois.dtype, bins, problem.rois.shape[0])


def _limits(dtype: torch.dtype, rois_dtype: torch.dtype, bins: int, num_rois: int) -> list[str]:
    reasons = []
    pair = (dtype, rois_dtype)
    if pair not in kernels.FORWARD_PAIRS and dtype in kernels.C_TYPES:
        names = [str(d).removeprefix("torch.") for d in pair]
        reasons.append(f"input dtype {names[0]} with rois dtype {names[1]} not supported")
    if bins >= INT32_LIMIT - THREADS:
        reasons.append(f"output_size with {bins} bins per ROI (needs fewer than 2^31 - 256)")
    if num_rois >= INT32_LIMIT:
        reasons.append(f"{num_rois} ROIs (needs fewer than 2^31: one grid row each)")
    return reasons


# ---- Forward ---------------------------------------------------------------------------------


def uses_channel_kernel(input: torch.Tensor, tuning: CupyTuning = DEFAULT_TUNING) -> bool:
    """Whether lanes should run over channels: channels adjacent in memory (channels_last)."""
    return (
        input.shape[1] >= tuning.chan_min_channels and input.stride(1) == 1 and input.stride(3) != 1
    )


def cvec_lanes(dtype: torch.dtype) -> int:
    """Channels in one of the cvec kernel's 16-byte vectors (4 float32, 8 float16, 2 float64)."""
    return CVEC_BYTES // dtype.itemsize


def cvec_thread_channels(dtype: torch.dtype, argmax: bool, wide: bool = False) -> int:
    """Channels of one cvec thread (CvecShape::kChannels): two vectors, but one for the 16-bit
    types with the argmax (8 float32, 4 float64, 16 or with the argmax 8 16-bit channels); in
    the wide kernel (`wide`, CvecWideShape) four vectors in float32 (16 channels)."""
    lanes = cvec_lanes(dtype)
    if wide and dtype.itemsize == 4:
        return 4 * lanes
    return lanes if lanes == 8 and argmax else 2 * lanes


def cvec_wide(
    input: torch.Tensor, argmax: bool, sizes: CudaSizes, tuning: CupyTuning = DEFAULT_TUNING
) -> bool:
    """Whether a forward that `forward_kernel` gives the cvec kernel runs its wide twin
    (`kernels.FORWARD_CVEC_WIDE`: four channel vectors a thread in float32), where a thread's
    work per bin shared by 16 channels instead of 8 pays: float32 inference on a map that fits
    in L2 (beyond it, half the threads a bin leave fewer loads in flight); float32 with the
    argmax beyond L2, and in L2 where the large tile fits (`cvec_large_tile`: with the static
    tile, half the lanes a bin lost). Measured: the choice table of tools/NOTES.md.
    ``tuning.cvec_wide`` forces the choice (True: wherever the cvec kernel is chosen); a forced
    ``tuning.forward_kernel`` runs as named."""
    if tuning.cvec_wide is not None:
        return tuning.cvec_wide
    if input.dtype != torch.float32:
        return False
    cached = 0 < _dense_bytes(input) <= sizes.l2_bytes
    if argmax:
        return not cached or cvec_large_tile(sizes, tuning)
    return cached


def single_map_kernel(
    input: torch.Tensor, bins: int, argmax: bool, sizes: CudaSizes, tuning: CupyTuning
) -> str:
    """The kernel of a single-map forward: `forward_kernel`'s, the cvec kernel's wide twin where
    `cvec_wide` says so (unless a kernel is forced)."""
    kernel = forward_kernel(input, bins, tuning)
    if (
        kernel == kernels.FORWARD_CVEC
        and tuning.forward_kernel is None
        and cvec_wide(input, argmax, sizes, tuning)
    ):
        return kernels.FORWARD_CVEC_WIDE
    return kernel


def uses_max_tables(
    problem: RoIPoolProblem,
    argmax: bool,
    sizes: CudaSizes,
    max_nan: bool,
    tuning: CupyTuning = DEFAULT_TUNING,
) -> bool:
    """Whether a single-map forward (its input as the kernel reads it: the staged copy where
    there is one) queues the tables of maxima (cuda/max_tables.cu) before its cvec kernel: its
    decision, its build and the buffers of `plan_max_tables`.

    Inference (`argmax` False) on the cvec kernels, float32, float16 or bfloat16, with the map
    dense channels_last (the tables share its strides) on a device with max.NaN (`max_nan`:
    sm_80 and later), a map that does not fit in L2 (the reads the tables save are then
    memory's: within L2 the build cost more than they saved on every bench workload but one,
    tools/NOTES.md), at least ``tuning.table_min_outputs`` outputs (below, the two launches cost
    more host time than the tables can save) and tables of at most ``tuning.table_max_bytes``.
    Whether the tables are then built and read is decided on the device from the ROIs
    (`plan_max_tables`). ``tuning.max_tables`` forces the tables (True: wherever they can be
    read, built whatever the count) or switches them off (False).
    """
    input = problem.input
    if tuning.max_tables is False or argmax or not max_nan:
        return False
    if input.dtype not in kernels.TABLE_DTYPES:
        return False
    bins = problem.pooled_height * problem.pooled_width
    kernel = single_map_kernel(input, bins, argmax, sizes, tuning)
    if kernel not in (kernels.FORWARD_CVEC, kernels.FORWARD_CVEC_WIDE):
        return False
    if not input.is_contiguous(memory_format=torch.channels_last) or input.numel() == 0:
        return False
    if tuning.max_tables:
        return True
    outputs = problem.num_rois * input.shape[1] * bins
    map_bytes = _dense_bytes(input)
    return (
        map_bytes > sizes.l2_bytes
        and outputs >= tuning.table_min_outputs
        and 2 * map_bytes <= tuning.table_max_bytes
    )


def table_buffer_elements(input: torch.Tensor) -> int:
    """Elements of `input`'s dtype in the tables' buffer: TABLE_HEAD_BYTES for the decision and
    the counts, then the 2 x 2 and the 4 x 4 table, each of the map's size."""
    return TABLE_HEAD_BYTES // input.element_size() + 2 * input.numel()


def table_savings_blocks(num_rois: int) -> int:
    """Blocks of the count of saved reads for `num_rois` ROIs (at least one)."""
    blocks = math.ceil(num_rois / kernels.TABLE_SAVINGS_THREADS)
    return max(1, min(blocks, kernels.TABLE_SAVINGS_BLOCKS))


def plan_table_savings(problem: RoIPoolProblem, decision: torch.Tensor) -> Launch:
    """The count's launch: `table_savings_blocks` blocks, each writing into the decision's
    bytes the element reads that the tables would save over its share of the problem's bins.

    Args:
        problem: the forward (its input as the cvec kernel reads it).
        decision: int32, TABLE_HEAD_BYTES on the input's device, 16-byte aligned.
    """
    input, rois = problem.input, problem.rois
    n, _, h, w = input.shape
    args = (
        pointer("rois", rois),
        integer("rs0", rois.stride(0)),
        integer("rs1", rois.stride(1)),
        integer("K", problem.num_rois),
        *(integer(name, v) for name, v in zip("NHW", (n, h, w), strict=True)),
        real("spatial_scale", problem.spatial_scale),
        integer("PH", problem.pooled_height),
        integer("PW", problem.pooled_width),
        pointer("decision", decision),
    )
    grid = (table_savings_blocks(problem.num_rois), 1, 1)
    name = kernels.table_savings_name(rois.dtype)
    return Launch(name, grid, (kernels.TABLE_SAVINGS_THREADS, 1, 1), 0, args)


def plan_max_tables(
    problem: RoIPoolProblem,
    decision: torch.Tensor,
    tables: torch.Tensor,
    sizes: CudaSizes,
    tuning: CupyTuning = DEFAULT_TUNING,
) -> Launch:
    """The tables' decision and build: sums `plan_table_savings`' counts, writes decision[0] =
    1 when they reach ``tuning.table_min_saved_reads`` per map position (always when
    ``tuning.max_tables`` forces the tables), else 0, and on a yes builds `tables` (the 2 x 2
    table, then the 4 x 4 one, each of the input's numel) from the problem's input; at most
    TABLE_BLOCKS_PER_SM blocks an SM, their threads striding over the work items (a thread's
    rows of one channel vector).

    Args:
        problem: the forward; its input (N, C, H, W) dense channels_last of a dtype in
            `kernels.TABLE_DTYPES`, C * itemsize a multiple of 16.
        decision: int32, TABLE_HEAD_BYTES, the counts written by `plan_table_savings`' launch
            before this one runs.
        tables: 2 * input.numel() elements of input's dtype, 16-byte aligned.
        sizes: the device's (its SM count).
    """
    input = problem.input
    n, c, h, w = input.shape
    vectors = c * input.element_size() // CVEC_BYTES
    threads = n * math.ceil(h / kernels.TABLE_ROWS) * w * vectors
    threshold = 0.0 if tuning.max_tables else tuning.table_min_saved_reads
    args = (
        pointer("input", input),
        *(integer(name, v) for name, v in zip("NCHW", (n, c, h, w), strict=True)),
        integer("counts", table_savings_blocks(problem.num_rois)),
        real("min_saved_per_position", threshold),
        pointer("decision", decision),
        pointer("tables", tables),
    )
    blocks = min(
        math.ceil(threads / kernels.TABLE_THREADS), TABLE_BLOCKS_PER_SM * sizes.multiprocessors
    )
    grid = (max(blocks, 1), 1, 1)
    block = (kernels.TABLE_THREADS, 1, 1)
    return Launch(kernels.max_tables_name(input.dtype), grid, block, 0, args)


def small_roi_bytes(kernel: str, bins: int, channels: int, dtype: torch.dtype, argmax: bool):
    """Shared memory of one ROI in a block of a small kernel: its bins' table entries, and for
    small_cvec its staged outputs (SmallCvecTile: its channels padded to whole threads', a slot
    each of the element's size, 32 bits for a 16-bit element with the argmax, and an int32
    argmax each when `argmax`)."""
    table = SMALL_BIN_BYTES * bins
    if kernel != kernels.FORWARD_SMALL_CVEC:
        return table
    per_thread = cvec_thread_channels(dtype, argmax)
    padded = -(-channels // per_thread) * per_thread
    slot = 4 if argmax and dtype.itemsize == 2 else dtype.itemsize
    return table + bins * padded * (slot + (4 if argmax else 0))


def _aligned_channels(input: torch.Tensor) -> bool:
    return (
        input.shape[1] > 0
        and input.stride(1) == 1
        and aligned_channel_vector(input, CVEC_BYTES) > 1
    )


def _image_offsets_fit_int32(input: torch.Tensor) -> bool:
    """Whether every element's offset from its image's first is below 2^31 (the cvec kernel
    steps within an image in 32-bit offsets)."""
    extents, strides = input.shape[1:], input.stride()[1:]
    last = sum((extent - 1) * stride for extent, stride in zip(extents, strides, strict=True))
    return last < INT32_LIMIT


def _can_run(kernel: str, input: torch.Tensor, bins: int) -> bool:
    if kernel == kernels.FORWARD_UNIT:
        return input.stride(3) == 1 and bins <= UNIT_MAX_BINS
    if kernel == kernels.FORWARD_SMALL:
        unit = input.stride(3) == 1
    elif kernel in (kernels.FORWARD_CVEC, kernels.FORWARD_CVEC_WIDE):
        unit = _aligned_channels(input) and _image_offsets_fit_int32(input)
    elif kernel == kernels.FORWARD_SMALL_CVEC:
        unit = _aligned_channels(input)
    else:
        return True  # plane and chan read any strides
    if kernel in (kernels.FORWARD_SMALL, kernels.FORWARD_SMALL_CVEC):
        needed = small_roi_bytes(kernel, bins, input.shape[1], input.dtype, True)
        return unit and needed <= SMALL_MAX_SHARED
    return unit


def forward_kernel(input: torch.Tensor, bins: int, tuning: CupyTuning = DEFAULT_TUNING) -> str:
    """The forward kernel for an input's strides and alignment and `bins` (PH * PW) per ROI (no
    device sync): the choice table of tools/NOTES.md.

    For channels_last: cvec when its channel vectors are 16-byte aligned (and an image's
    offsets fit 32 bits), chan otherwise; for any other unit W stride (NCHW contiguous), unit
    (PH * PW at most UNIT_MAX_BINS: its bin edges fit a block's shared memory); plane for the
    rest. Where a ROI has at most
    ``tuning.small_roi_outputs`` outputs (C * PH * PW), small_cvec replaces cvec and small
    replaces unit. ``tuning.forward_kernel`` overrides the choice where that kernel can run.
    """
    forced = tuning.forward_kernel
    if forced is not None and _can_run(forced, input, bins):
        return forced
    few = input.shape[1] * bins <= tuning.small_roi_outputs
    if uses_channel_kernel(input, tuning):
        if aligned_channel_vector(input, CVEC_BYTES) <= 1:
            return kernels.FORWARD_CHAN
        if few and _can_run(kernels.FORWARD_SMALL_CVEC, input, bins):
            return kernels.FORWARD_SMALL_CVEC
        if _can_run(kernels.FORWARD_CVEC, input, bins):
            return kernels.FORWARD_CVEC
        return kernels.FORWARD_CHAN
    if input.stride(3) == 1:
        if few and _can_run(kernels.FORWARD_SMALL, input, bins):
            return kernels.FORWARD_SMALL
        if _can_run(kernels.FORWARD_UNIT, input, bins):
            return kernels.FORWARD_UNIT
    return kernels.FORWARD_PLANE


def stages_channels_last(
    problem: RoIPoolProblem, sizes: CudaSizes, tuning: CupyTuning = DEFAULT_TUNING
) -> bool:
    """Whether the forward `problem` of an NCHW-like input (a unit W stride) runs on a
    channels_last copy of it made by the copy kernel (`plan_copy_channels_last`), pooled by the
    channel-vector kernels, instead of on the input itself (no device sync: shapes and dtypes
    only).

    The copy reads and writes the input once; the channel-vector kernels then read each window
    element of 16 bytes of channels with one load, where the NCHW kernels fetch a 32-byte sector
    of a window row for each channel, and reduce 16-bit inputs two channels an instruction
    (with the argmax too, on sm_90; float16 on sm_80). Staged (the choice table of
    tools/NOTES.md, measured on every bench workload):

    - in the small kernels' regime (few outputs per ROI, many ROIs), when the input fits in L2;
    - when the outputs are at least ``tuning.stage_min_reads`` times the input's elements (so
      that the copy is a small part of the work), and either the input does not fit in L2 (its
      NCHW windows' sectors are re-read from memory) or its elements are of 16 or 32 bits
      (float64 in L2: not measured);
    - for 16-bit inputs that do not fit in L2, already from
      ``tuning.stage_min_reads_16bit_beyond_l2`` outputs an input element (their copy reads
      two positions a load, their NCHW windows come from memory).

    Only where the copy's channel vectors are 16-byte aligned (C * itemsize a multiple of 16),
    C has at least ``tuning.chan_min_channels`` channels and the copy kernel's 32-bit offsets
    reach every element (`copy_fits_int32`); ``tuning.stage_channels_last`` forces the choice
    there (True) or switches staging off (False); a forced forward kernel never stages.
    """
    input = problem.input
    if tuning.stage_channels_last is False or tuning.forward_kernel is not None:
        return False
    if not _can_stage(input, tuning):
        return False
    if tuning.stage_channels_last:
        return True
    bins = problem.pooled_height * problem.pooled_width
    cached = _dense_bytes(input) <= sizes.l2_bytes
    if forward_kernel(input, bins, tuning) == kernels.FORWARD_SMALL:
        return cached
    outputs = problem.rois.shape[0] * input.shape[1] * bins
    return _stages_by_reads(outputs, (input,), sizes, tuning)


def _can_stage(input: torch.Tensor, tuning: CupyTuning) -> bool:
    """Whether the copy kernel can stage `input` for the channel-vector kernels: a unit W stride
    (not already channel-adjacent), at least ``tuning.chan_min_channels`` channels in 16-byte
    vectors, and the copy's grid and 32-bit offsets within their limits."""
    if uses_channel_kernel(input, tuning) or input.stride(3) != 1:
        return False
    channels = input.shape[1]
    return (
        channels >= tuning.chan_min_channels
        and channels * input.element_size() % CVEC_BYTES == 0
        and math.ceil(channels / kernels.copy_channels(input.dtype)) <= MAX_GRID_Y
        and copy_fits_int32(input)
    )


def _stages_by_reads(
    outputs: int, maps: Sequence[torch.Tensor], sizes: CudaSizes, tuning: CupyTuning
) -> bool:
    """The staging rule outside the small kernels' regime, for `outputs` pooled from `maps`
    (one input, or a pyramid's levels, of one dtype) counted together: at least
    ``tuning.stage_min_reads`` outputs an element (``stage_min_reads_16bit_beyond_l2`` for
    16-bit maps beyond L2), and not float64 maps in L2."""
    itemsize = maps[0].element_size()
    cached = sum(_dense_bytes(x) for x in maps) <= sizes.l2_bytes
    min_reads = tuning.stage_min_reads
    if not cached and itemsize == 2:
        min_reads = tuning.stage_min_reads_16bit_beyond_l2
    if outputs < min_reads * sum(x.numel() for x in maps):
        return False
    return not cached or itemsize <= 4


def stages_pyramid(
    problem: MultiScaleRoIPoolProblem, sizes: CudaSizes, tuning: CupyTuning = DEFAULT_TUNING
) -> bool:
    """Whether the multi-level forward `problem` of an NCHW pyramid (every level taking the
    unit kernel) runs on channels_last copies of all its levels, made by the copy kernel
    (`plan_copy_channels_last`) and pooled by the cvec kernel over levels in one launch;
    shapes and dtypes only, no device sync.

    `stages_channels_last`'s rule with the pyramid as one map (its elements and bytes summed):
    the host does not know how many ROIs each level gets (their levels are computed on the
    device). Staging only some levels would take a launch for each kernel, each with a block
    for every ROI; those blocks of the other launch's ROIs cost more than the coarse levels'
    copies saved (tools/NOTES.md, the fused multi-level kernels). Only where the copy can
    stage every level; ``tuning.stage_channels_last`` forces the choice there (True) or
    switches staging off (False); a forced forward kernel never stages.
    """
    features = problem.features
    if tuning.stage_channels_last is False or tuning.forward_kernel is not None:
        return False
    bins = problem.pooled_height * problem.pooled_width
    if not all(
        x.numel() > 0
        and _can_stage(x, tuning)
        and forward_kernel(x, bins, tuning) == kernels.FORWARD_UNIT
        for x in features
    ):
        return False
    if tuning.stage_channels_last:
        return True
    outputs = problem.rois.shape[0] * features[0].shape[1] * bins
    return _stages_by_reads(outputs, features, sizes, tuning)


def plan_copy_channels_last(input: torch.Tensor, copy: torch.Tensor) -> Launch | None:
    """The launch that copies `input` into `copy`, bit for bit; None when there is nothing to
    copy.

    Args:
        input: (N, C, H, W) with a unit W stride (any other strides), every offset within an
            image below 2^31 elements (`copy_fits_int32`).
        copy: the same shape and dtype, dense channels_last.

    Raises:
        ValueError: `copy` is not `input`'s shape and dtype, dense channels_last, or `input` has
            no unit W stride, or an image of offsets beyond 32 bits.
    """
    dense = copy.is_contiguous(memory_format=torch.channels_last)
    if copy.shape != input.shape or copy.dtype != input.dtype or not dense:
        raise ValueError(
            f"copy: expected a dense channels_last tensor of shape {tuple(input.shape)} and "
            f"dtype {input.dtype}, got shape {tuple(copy.shape)}, dtype {copy.dtype}, strides "
            f"{copy.stride()}"
        )
    if input.stride(3) != 1 and input.shape[3] > 1:
        raise ValueError(f"input: expected a W stride of 1, got strides {input.stride()}")
    if not copy_fits_int32(input):
        raise ValueError(
            f"input: expected every offset within an image below 2^31 elements (the copy "
            f"steps in 32-bit offsets), got shape {tuple(input.shape)} and strides "
            f"{input.stride()}; copy it with torch instead"
        )
    if input.numel() == 0:
        return None
    n, c, h, w = input.shape
    position_tiles = math.ceil(h * w / kernels.COPY_POSITIONS)
    args = (
        pointer("input", input),
        *(integer(name, v) for name, v in zip("CHW", (c, h, w), strict=True)),
        *(integer(name, v) for name, v in zip(("sN", "sC", "sH"), input.stride()[:3], strict=True)),
        integer("position_tiles", position_tiles),
        pointer("output", copy),
    )
    grid = (n * position_tiles, math.ceil(c / kernels.copy_channels(input.dtype)), 1)
    block = (32, kernels.COPY_ROWS, 1)
    return Launch(kernels.copy_name(input.dtype), grid, block, 0, args)


def copy_fits_int32(input: torch.Tensor) -> bool:
    """Whether the channels_last copy kernel can copy `input`: every offset within an image, of
    the input and of its dense copy (C * H * W elements), below 2^31, and the grid's images by
    position tiles within its limit."""
    n, c, h, w = input.shape
    tiles = n * math.ceil(h * w / kernels.COPY_POSITIONS)
    return _image_offsets_fit_int32(input) and c * h * w < INT32_LIMIT and tiles < INT32_LIMIT


def channels_per_block(
    num_rois: int, channels: int, bins: int, multiprocessors: int, target: int, tuning: CupyTuning
) -> int:
    """Channels per block: about `target` outputs, but enough blocks for the GPU."""
    per_block = max(1, min(channels, target // bins, MAX_CHANNELS_PER_BLOCK))
    while per_block > 1 and num_rois * math.ceil(channels / per_block) < (
        tuning.min_blocks_per_sm * multiprocessors
    ):
        per_block = (per_block + 1) // 2
    return per_block


def whole_unit_steps(per_block: int, bins: int, dtype: torch.dtype) -> int:
    """`per_block` rounded down to whole steps of the unit kernel's threads (a step covers
    UNIT_CHANNELS channels, half for float64, in each of the block's groups of `bins` threads),
    so that no step reads channels it does not store."""
    channels = UNIT_CHANNELS // 2 if dtype == torch.float64 else UNIT_CHANNELS
    step = channels * (THREADS // bins if bins <= THREADS else 1)
    return per_block // step * step if per_block >= step else per_block


def cvec_dynamic_tile(dtype: torch.dtype, argmax: bool, wide: bool) -> bool:
    """Whether the cvec kernel (`wide`: its wide twin) keeps its tile in dynamic shared memory
    (kDynamicTile in forward_cvec.cu): the wide kernel's float32 forwards with the argmax."""
    return wide and argmax and dtype == torch.float32


def cvec_large_tile(sizes: CudaSizes, tuning: CupyTuning) -> bool:
    """Whether CVEC_BLOCKS_PER_SM blocks of ``tuning.cvec_wide_tile_bytes`` fit in one SM's
    shared memory (one block's opt-in limit and its reserve)."""
    per_sm = sizes.shared_per_block_optin + 1024
    return CVEC_BLOCKS_PER_SM * (tuning.cvec_wide_tile_bytes + CVEC_OTHER_SHARED) <= per_sm


def cvec_tile_bytes(
    dtype: torch.dtype,
    argmax: bool,
    wide: bool,
    input_bytes: int,
    sizes: CudaSizes,
    tuning: CupyTuning,
) -> int:
    """The cvec kernel's tile in bytes for a map of `input_bytes`: CVEC_TILE_BYTES, but where
    `cvec_dynamic_tile` (the launch's dynamic shared memory) ``tuning.cvec_wide_tile_bytes`` on
    a map in L2 when `cvec_large_tile`: eight lanes of 16 channels a bin on 7x7 bins. Beyond
    L2, the static tile's four lanes ran faster (tools/NOTES.md)."""
    cached = 0 < input_bytes <= sizes.l2_bytes
    if cvec_dynamic_tile(dtype, argmax, wide) and cached and cvec_large_tile(sizes, tuning):
        return tuning.cvec_wide_tile_bytes
    return CVEC_TILE_BYTES


def cvec_tile_outputs(dtype: torch.dtype, argmax: bool, tile_bytes: int = CVEC_TILE_BYTES) -> int:
    """Outputs one round of the cvec kernel holds in its tile of `tile_bytes` (capacity in
    forward_cvec.cu): its values and argmax parts each a whole number of 16-byte pieces; with
    the argmax a 16-bit value takes a 32-bit slot."""
    slot = 4 if argmax and dtype.itemsize == 2 else dtype.itemsize
    return tile_bytes // (slot + (4 if argmax else 0)) // 8 * 8


def cvec_channels_per_block(
    num_rois: int,
    channels: int,
    bins: int,
    dtype: torch.dtype,
    argmax: bool,
    multiprocessors: int,
    tuning: CupyTuning,
    wide: bool = False,
    tile_bytes: int = CVEC_TILE_BYTES,
) -> int:
    """The cvec kernel's channels per block (`wide`: its wide twin's): a thread's channels times
    a power of two of threads per bin, at most CVEC_THREADS (fewer when C has fewer channels,
    when the block's outputs would not fit its tile of `tile_bytes` in one round, or when the
    GPU would get too few blocks)."""
    per_thread = cvec_thread_channels(dtype, argmax, wide)
    capacity = cvec_tile_outputs(dtype, argmax, tile_bytes)
    threads = 1
    while threads < CVEC_THREADS and threads * per_thread < channels:
        threads *= 2
    while threads > 1 and threads * per_thread * bins > capacity:
        threads //= 2
    while threads > 1 and num_rois * math.ceil(channels / (threads * per_thread)) < (
        tuning.min_blocks_per_sm * multiprocessors
    ):
        threads //= 2
    return threads * per_thread


def plane_threads(bins: int) -> int:
    """Block size of the plane and atomic backward kernels: whole groups of `bins` threads (as
    many as fit in 256), rounded up to a warp; 256 when one group does not fit."""
    if bins > THREADS:
        return THREADS
    return -(-(THREADS // bins) * bins // 32) * 32


def plan_forward(
    problem: RoIPoolProblem,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
    sizes: CudaSizes,
    tuning: CupyTuning = DEFAULT_TUNING,
    tables: torch.Tensor | None = None,
    table_decision: torch.Tensor | None = None,
) -> Launch | None:
    """The forward launch for `problem`; None when there is nothing to do (no output and no
    bad-ROI log to fill).

    Args:
        problem: the validated call; input and rois may have any strides. Its ``bad_roi_log``
            (or None) is passed to the kernel, which records invalid ROIs there.
        output: contiguous (K, C, PH, PW) tensor of the input's dtype.
        argmax: contiguous int32 tensor of the same shape, or None to skip the argmax.
        sizes: the device's SM count and L2 size (an L2 of 0: inputs count as not cached).
        tuning: the planning constants.
        tables, table_decision: None, or where `uses_max_tables` says so the buffers of
            `plan_max_tables` (the tables after the decision's bytes), passed to the cvec
            kernels (which read them in inference when the decision is 1); other kernels take
            none.
    """
    input, rois = problem.input, problem.rois
    ph, pw = problem.pooled_height, problem.pooled_width
    log = problem.bad_roi_log
    if problem.num_rois == 0 or (output.numel() == 0 and log is None):
        return None
    kernel = single_map_kernel(input, ph * pw, argmax is not None, sizes, tuning)
    name = kernels.forward_name(kernel, input.dtype, rois.dtype, argmax is not None)
    head = (
        pointer("input", input),
        *(integer(n, v) for n, v in zip(("N", "C", "H", "W"), input.shape, strict=True)),
        *(integer(n, v) for n, v in zip(("sN", "sC", "sH", "sW"), input.stride(), strict=True)),
        pointer("rois", rois),
        integer("rs0", rois.stride(0)),
        integer("rs1", rois.stride(1)),
        real("spatial_scale", problem.spatial_scale),
        integer("PH", ph),
        integer("PW", pw),
    )
    tail = (pointer("output", output), pointer("argmax", argmax), pointer("bad_roi_log", log))
    grid, block, shared_mem, extra = _forward_shape(
        kernel, input, _dense_bytes(input), problem.num_rois, ph, pw, argmax, sizes, tuning
    )
    if kernel in (kernels.FORWARD_CVEC, kernels.FORWARD_CVEC_WIDE):
        extra += (pointer("tables", tables), pointer("table_decision", table_decision))
    return Launch(name, grid, block, shared_mem, (*head, *extra, *tail))


def _dense_bytes(input: torch.Tensor) -> int:
    size = input.element_size()
    for extent in input.shape:
        size *= extent
    return size


def _unit_block_elements(input, input_bytes, sizes, tuning, levels):
    """The unit kernel's outputs per block: cached, or streamed (single map or pyramid levels)
    scaled to the same bytes of planes as 4-byte elements."""
    if input_bytes <= sizes.l2_bytes:
        return tuning.unit_block_elements_cached
    target = tuning.unit_block_elements_levels if levels else tuning.unit_block_elements_streamed
    return max(1, target * 4 // input.element_size())


def _forward_shape(
    kernel, input, input_bytes, num_rois, ph, pw, argmax, sizes, tuning, levels=False
):
    """(grid, block, dynamic shared memory, the arguments after PW) of forward `kernel` for
    inputs like `input` (its channels and dtype) of `input_bytes` in all, and `num_rois`;
    `levels`: for the fused multi-level kernel."""
    channels = input.shape[1]
    multiprocessors = sizes.multiprocessors
    if kernel in (kernels.FORWARD_SMALL, kernels.FORWARD_SMALL_CVEC):
        roi_bytes = small_roi_bytes(kernel, ph * pw, channels, input.dtype, argmax is not None)
        per_block = small_rois_per_block(num_rois, channels * ph * pw, roi_bytes, sizes, tuning)
        extra = (integer("rois_per_block", per_block), integer("K", num_rois))
        grid = (math.ceil(num_rois / per_block), 1, 1)
        return grid, (THREADS, 1, 1), roi_bytes * per_block, extra
    if kernel == kernels.FORWARD_CHAN:
        cache_edges = ph + pw <= tuning.max_cached_edges
        grid_y = _grid_y(channels, CHAN_LANES)
        extra = (integer("cache_edges", int(cache_edges)),)
        shared_mem = 8 * (ph + pw) if cache_edges else 0
        return (num_rois, grid_y, 1), (CHAN_LANES, THREADS // CHAN_LANES, 1), shared_mem, extra
    tile_bytes = 0  # a dynamic tile's
    if kernel in (kernels.FORWARD_CVEC, kernels.FORWARD_CVEC_WIDE):
        # The multi-level wide kernel keeps two vectors with the argmax (four spill there).
        wide = kernel == kernels.FORWARD_CVEC_WIDE and not (levels and argmax is not None)
        dtype, has_argmax = input.dtype, argmax is not None
        tile = cvec_tile_bytes(dtype, has_argmax, wide, input_bytes, sizes, tuning)
        per_block = cvec_channels_per_block(
            num_rois, channels, ph * pw, dtype, has_argmax, multiprocessors, tuning, wide, tile
        )
        if cvec_dynamic_tile(dtype, has_argmax, wide):
            tile_bytes = tile
    else:
        target = tuning.block_elements
        if kernel == kernels.FORWARD_UNIT:
            target = _unit_block_elements(input, input_bytes, sizes, tuning, levels)
        per_block = channels_per_block(num_rois, channels, ph * pw, multiprocessors, target, tuning)
        if kernel == kernels.FORWARD_UNIT:
            per_block = whole_unit_steps(per_block, ph * pw, input.dtype)
    extra = (integer("channels_per_block", per_block),)
    shared_mem = tile_bytes
    if kernel == kernels.FORWARD_UNIT:
        shared_mem = UNIT_GEOMETRY_BYTES + 8 * (ph + pw)
    return (num_rois, _grid_y(channels, per_block), 1), (THREADS, 1, 1), shared_mem, extra


# ---- Multi-level (pyramid) forward ----------------------------------------------------------

# The members of one level's map (LevelMap<T> in cuda/common.cuh), one word each, in order; the
# kernels take kernels.MAX_LEVELS of them as one parameter, the unused ones zero.
LEVEL_MAP_FIELDS = ("input", "H", "W", "sN", "sC", "sH", "sW", "spatial_scale")


def level_names(field: str, count: int) -> tuple[str, ...]:
    """The argument names of `field` for the first `count` levels (``input0``, ``input1``, ...
    for "input")."""
    return tuple(f"{field}{level}" for level in range(count))


def level_maps(features: Sequence[torch.Tensor], spatial_scales: Sequence[float]) -> tuple:
    """The multi-level kernels' table of maps (LevelMaps<T>): MAX_LEVELS * 8 named words
    (``input0``, ``H0``, ... ``spatial_scale0``, ``input1``, ...), the unused levels zero."""
    words = []
    for level in range(kernels.MAX_LEVELS):
        if level < len(features):
            x = features[level]
            words.append(pointer(f"input{level}", x))
            values, scale = (*x.shape[2:], *x.stride()), spatial_scales[level]
        else:
            words.append(pointer(f"input{level}", None))
            values, scale = (0,) * 6, 0.0
        fields = LEVEL_MAP_FIELDS[1:-1]
        words += [integer(f"{f}{level}", v) for f, v in zip(fields, values, strict=True)]
        words.append(real(f"spatial_scale{level}", scale))
    return tuple(words)


def forward_levels_kernel(
    features: Sequence[torch.Tensor], bins: int, tuning: CupyTuning = DEFAULT_TUNING
) -> str:
    """The forward kernel family that pools every level of a multi-level call: the one that
    `forward_kernel` picks for each level when they agree (they do for levels of one layout:
    the choice reads the layout, the alignment, C and `bins`, and H and W only to keep an image
    of 2^31 elements or more from the cvec kernel); otherwise chan when every level has its
    channels adjacent, else plane (both read any strides)."""
    chosen = {forward_kernel(x, bins, tuning) for x in features}
    if len(chosen) == 1:
        return chosen.pop()
    if all(uses_channel_kernel(x, tuning) for x in features):
        return kernels.FORWARD_CHAN
    return kernels.FORWARD_PLANE


def plan_forward_levels(
    problem: MultiScaleRoIPoolProblem,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
    sizes: CudaSizes,
    tuning: CupyTuning = DEFAULT_TUNING,
) -> Launch | None:
    """The fused forward launch of a multi-level call (one launch for every level); None when
    there is nothing to do. Needs no ROI's level: the grid and blocks are those of the
    single-level kernel over all K ROIs (the unit kernel's block size as if every level's input
    were one, cached in L2 only when all of them fit together, else
    ``tuning.unit_block_elements_levels``).

    Args:
        problem: the validated call (at most kernels.MAX_LEVELS levels, any strides; its
            ``levels`` (K,) int64 and ``bad_roi_log`` go to the kernel).
        output, argmax, sizes, tuning: as for `plan_forward`.
    """
    features, rois, levels = problem.features, problem.rois, problem.levels
    first = features[0]
    ph, pw = problem.pooled_height, problem.pooled_width
    num_rois = rois.shape[0]
    log = problem.bad_roi_log
    if num_rois == 0 or (output.numel() == 0 and log is None):
        return None
    if len(features) > kernels.MAX_LEVELS:
        raise ValueError(
            f"features: the fused kernels take at most {kernels.MAX_LEVELS} levels, got "
            f"{len(features)}"
        )
    kernel = forward_levels_kernel(features, ph * pw, tuning)
    name = kernels.forward_name(
        kernels.levels_kernel(kernel), first.dtype, rois.dtype, argmax is not None
    )
    head = (
        *level_maps(features, problem.spatial_scales),
        integer("L", len(features)),
        pointer("levels", levels),
        integer("ls0", levels.stride(0)),
        integer("N", first.shape[0]),
        integer("C", first.shape[1]),
        pointer("rois", rois),
        integer("rs0", rois.stride(0)),
        integer("rs1", rois.stride(1)),
        integer("PH", ph),
        integer("PW", pw),
    )
    tail = (pointer("output", output), pointer("argmax", argmax), pointer("bad_roi_log", log))
    input_bytes = sum(_dense_bytes(x) for x in features)
    grid, block, shared_mem, extra = _forward_shape(
        kernel, first, input_bytes, num_rois, ph, pw, argmax, sizes, tuning, levels=True
    )
    args = (*head, *extra, *tail)
    table = kernels.MAX_LEVELS * len(LEVEL_MAP_FIELDS)
    return Launch(name, grid, block, shared_mem, args, (table,) + (1,) * (len(args) - table))


def small_rois_per_block(
    num_rois: int, roi_outputs: int, roi_bytes: int, sizes: CudaSizes, tuning: CupyTuning
) -> int:
    """ROIs per block of the small kernels: about ``tuning.small_block_elements`` outputs, at
    most SMALL_MAX_SHARED bytes of `roi_bytes` each, and halved until the grid has enough
    blocks."""
    per_block = max(1, tuning.small_block_elements // max(roi_outputs, 1))
    per_block = max(1, min(per_block, SMALL_MAX_SHARED // roi_bytes, num_rois))
    while per_block > 1 and math.ceil(num_rois / per_block) < (
        tuning.min_blocks_per_sm * sizes.multiprocessors
    ):
        per_block = (per_block + 1) // 2
    return per_block


def _grid_y(channels: int, per_block: int) -> int:
    """Grid rows over channel blocks: at least one (a launch with no channels still records bad
    ROIs), at most the grid's limit (the kernels loop over the rest)."""
    return max(1, min(math.ceil(channels / per_block), MAX_GRID_Y))


# ---- Backward --------------------------------------------------------------------------------


def planes_shared(plane_bytes: int, bins: int) -> int:
    """Dynamic shared memory of the planes kernel: the bins' offset table, then the planes."""
    return 8 * bins + plane_bytes


def backward_kernel(
    input_shape: tuple[int, int, int, int],
    input_dtype: torch.dtype,
    argmax_shape: tuple[int, ...],
    sizes: CudaSizes,
    tuning: CupyTuning = DEFAULT_TUNING,
) -> str:
    """A planes kernel when a block's gradient planes fit in shared memory and there are enough
    (image, channel) blocks or the gradient is small (``tuning.planes_small_gradient_bytes``),
    else BACKWARD_ATOMIC. The planes kernel is BACKWARD_PLANES_GROUPED (each image's ROIs
    listed by a launch before it) where scanning every ROI's batch index would be a large part
    of its blocks' work (`groups_rois_first`), else BACKWARD_PLANES. ``tuning.backward_kernel``
    forces one (a planes kernel only where it can run).

    Args:
        input_shape: (N, C, H, W); input_dtype: the gradient's dtype.
        argmax_shape: (K, C, PH, PW).
        sizes: the device's SM count and the shared memory a block may opt in to.
        tuning: the planning constants.
    """
    num_images, channels, height, width = input_shape
    num_rois, _, ph, pw = argmax_shape
    per_block = tuning.planes_channels
    plane_bytes = per_block * height * width * accumulate_dtype(input_dtype).itemsize
    can_run = (
        num_rois * ph * pw > 0  # with nothing to add, grad_input is the atomic path's zero fill
        and planes_shared(plane_bytes, ph * pw) + PLANES_STATIC_SHARED
        <= sizes.shared_per_block_optin
        and per_block * ph * pw * kernels.PLANES_THREADS[-1] < INT32_LIMIT
        and group_rois_size(num_rois, 1, num_images) < INT32_LIMIT
        and num_images * math.ceil(channels / per_block) < INT32_LIMIT
    )
    planes_kernels = (kernels.BACKWARD_PLANES, kernels.BACKWARD_PLANES_GROUPED)
    if tuning.backward_kernel is not None:
        planes = tuning.backward_kernel in planes_kernels and can_run
        return tuning.backward_kernel if planes else kernels.BACKWARD_ATOMIC
    enough_blocks = num_images * channels >= tuning.planes_min_blocks_per_sm * sizes.multiprocessors
    gradient_bytes = num_images * channels * height * width * accumulate_dtype(input_dtype).itemsize
    small = gradient_bytes <= tuning.planes_small_gradient_bytes
    if not (can_run and (enough_blocks or small)):
        return kernels.BACKWARD_ATOMIC
    blocks = num_images * math.ceil(channels / per_block)
    threads = planes_threads(
        planes_shared(plane_bytes, ph * pw), sizes.shared_per_block_optin, tuning
    )
    grouped = groups_rois_first(blocks, num_rois, threads, tuning)
    return kernels.BACKWARD_PLANES_GROUPED if grouped else kernels.BACKWARD_PLANES


def groups_rois_first(
    blocks: int, num_rois: int, threads: int, tuning: CupyTuning = DEFAULT_TUNING
) -> bool:
    """Whether the single-level planes backward of `blocks` blocks of `threads` threads over
    `num_rois` ROIs reads each image's ROIs from a list made by a launch before it
    (BACKWARD_PLANES_GROUPED) rather than scanning every ROI's batch index in each block: when
    the scans would check at least ``tuning.planes_group_min_checks`` batch indices in all, or
    the blocks have 1,024 threads (one an SM, which idles at every barrier of the scan).
    The measurements behind it: docs/dev-log.md, "The single-level planes backward reads lists
    where the scan is the work"."""
    return (
        threads == kernels.PLANES_THREADS[-1] or blocks * num_rois >= tuning.planes_group_min_checks
    )


def channels_last_gradient(
    grad_input_bytes: int, l2_bytes: int, tuning: CupyTuning = DEFAULT_TUNING
) -> bool:
    """Whether the backward writes a channels_last input's gradient channels_last (else
    contiguous, which roi_ops copies): when the `grad_input_bytes` it writes fit in `l2_bytes`.
    Beyond L2, the planes kernel's channel-strided stores leave partial sectors to be written
    back, and a contiguous gradient plus torch's copy is faster; within L2 the copy is the
    larger cost. ``tuning.channels_last_gradient`` forces one."""
    if tuning.channels_last_gradient is not None:
        return tuning.channels_last_gradient
    return grad_input_bytes <= l2_bytes


def planes_threads(shared_mem: int, shared_limit: int, tuning: CupyTuning = DEFAULT_TUNING) -> int:
    """Block size of the planes kernel for `shared_mem` bytes of dynamic shared memory per block:
    1024 when two blocks would not fit in `shared_limit` (the opt-in limit of one block, about
    an SM's shared memory; a lone 256-thread block keeps too few loads in flight), else 256.
    ``tuning.planes_threads`` forces one."""
    if tuning.planes_threads is not None:
        return tuning.planes_threads
    alone = 2 * (shared_mem + PLANES_STATIC_SHARED) > shared_limit
    return kernels.PLANES_THREADS[-1] if alone else kernels.PLANES_THREADS[0]


def _grad_output_strides(grad_output: torch.Tensor) -> tuple:
    """grad_output's four strides as the backward kernels' arguments gs0 to gs3."""
    names = ("gs0", "gs1", "gs2", "gs3")
    return tuple(integer(n, v) for n, v in zip(names, grad_output.stride(), strict=True))


def _atomic_channels_per_block(
    grad_bytes: int, num_rois: int, channels: int, bins: int, sizes: CudaSizes, tuning: CupyTuning
) -> int:
    """The atomic backward's channels per block for gradients of `grad_bytes` in all: blocks of
    tuning.block_elements outputs while the gradients fit in L2, else of the streamed size."""
    target = (
        tuning.block_elements
        if grad_bytes <= sizes.l2_bytes
        else tuning.backward_block_elements_streamed
    )
    return channels_per_block(num_rois, channels, bins, sizes.multiprocessors, target, tuning)


def plan_backward(
    grad_output: torch.Tensor,
    argmax: torch.Tensor,
    rois: torch.Tensor,
    grad_input: torch.Tensor,
    kernel: str,
    sizes: CudaSizes,
    tuning: CupyTuning = DEFAULT_TUNING,
    groups: torch.Tensor | None = None,
) -> Launch | None:
    """The backward launch (None when there is nothing to launch).

    Args:
        grad_output: (K, C, PH, PW) of the input's dtype, any strides (zero strides too).
        argmax: contiguous int32 (K, C, PH, PW).
        rois: the forward's (K, 5) rois, any strides: the kernels read each ROI's batch index.
        grad_input: (N, C, H, W), contiguous or channels_last: for BACKWARD_ATOMIC zero-filled, of
            `accumulate_dtype(grad_output.dtype)`; for the planes kernels of grad_output's
            dtype, any contents (every element is written).
        kernel: one of kernels.BACKWARD_KERNELS (see `backward_kernel`).
        sizes: the device's SM count, L2 size (0: grad_input counts as not cached) and the
            shared memory a block may opt in to (picks the planes kernel's block size).
        tuning: the planning constants.
        groups: for BACKWARD_PLANES_GROUPED, the int32 buffer in which `plan_group_rois`'s
            launch (one level, queued before this one) lists each image's ROIs.

    Raises:
        ValueError: grad_input's H stride is not W times its W stride; a planes kernel with no
            ROI or no bin; BACKWARD_PLANES_GROUPED without `groups`.
    """
    num_rois, channels, ph, pw = argmax.shape
    if grad_input.numel() == 0 or (argmax.numel() == 0 and kernel == kernels.BACKWARD_ATOMIC):
        return None
    num_images, _, height, width = grad_input.shape
    image_stride, channel_stride, row_stride, pixel_stride = grad_input.stride()
    if row_stride != width * pixel_stride and height > 1:  # kernels index pixels h * W + w
        raise ValueError(
            f"grad_input's H stride must be W times its W stride (contiguous or channels_last), "
            f"got strides {grad_input.stride()} for shape {tuple(grad_input.shape)}"
        )
    sources = (pointer("rois", rois), integer("rs0", rois.stride(0)))
    if kernel == kernels.BACKWARD_PLANES_GROUPED:
        if groups is None:
            raise ValueError(
                "groups: the grouped planes backward reads each image's ROIs from "
                "plan_group_rois' buffer; got None"
            )
        sources = (pointer("groups", groups),)
    head = (
        pointer("grad_output", grad_output),
        *_grad_output_strides(grad_output),
        pointer("argmax", argmax),
        *sources,
        integer("N", num_images),
        integer("C", channels),
        integer("HW", height * width),
        integer("PH", ph),
        integer("PW", pw),
    )
    gradient = (
        pointer("grad_input", grad_input),
        integer("gi_image", image_stride),
        integer("gi_channel", channel_stride),
        integer("gi_pixel", pixel_stride),
    )
    if kernel != kernels.BACKWARD_ATOMIC:
        if argmax.numel() == 0:
            raise ValueError("the planes backward needs at least one ROI and one bin")
        per_block = tuning.planes_channels
        blocks = num_images * math.ceil(channels / per_block)
        accumulator = accumulate_dtype(grad_input.dtype).itemsize
        shared = planes_shared(per_block * height * width * accumulator, ph * pw)
        threads = planes_threads(shared, sizes.shared_per_block_optin, tuning)
        name = kernels.backward_name(kernel, grad_output.dtype, rois.dtype, threads)
        args = (*head, integer("channels_per_block", per_block), *gradient)
        return Launch(
            name, (blocks, 1, 1), (threads, 1, 1), shared, (*args, integer("K", num_rois))
        )
    name = kernels.backward_name(kernel, grad_output.dtype, rois.dtype)
    grad_bytes = grad_input.numel() * grad_input.element_size()
    per_block = _atomic_channels_per_block(grad_bytes, num_rois, channels, ph * pw, sizes, tuning)
    args = (*head, integer("channels_per_block", per_block), *gradient)
    block = (plane_threads(ph * pw), 1, 1)
    return Launch(name, (num_rois, _grid_y(channels, per_block), 1), block, 0, args)


# ---- Multi-level (pyramid) backward ---------------------------------------------------------

# The members of one level's gradient (LevelGrad<A> in cuda/common.cuh), one word each.
LEVEL_GRAD_FIELDS = ("grad_input", "gi_image", "gi_channel", "gi_pixel")


def level_grads(grads: Sequence[torch.Tensor]) -> tuple:
    """The multi-level backward's table of gradients (LevelGrads<A>): MAX_LEVELS * 4 named words
    (``grad_input0``, ``gi_image0``, ...), the unused levels zero.

    Raises:
        ValueError: a gradient's H stride is not W times its W stride.
    """
    words = []
    for level in range(kernels.MAX_LEVELS):
        grad = grads[level] if level < len(grads) else None
        values = (0, 0, 0)
        if grad is not None:
            _, _, height, width = grad.shape
            image_stride, channel_stride, row_stride, pixel_stride = grad.stride()
            if row_stride != width * pixel_stride and height > 1:  # kernels index h * W + w
                raise ValueError(
                    f"grads[{level}]: the H stride must be W times the W stride (contiguous or "
                    f"channels_last), got strides {grad.stride()} for shape {tuple(grad.shape)}"
                )
            values = (image_stride, channel_stride, pixel_stride)
        words.append(pointer(f"grad_input{level}", grad))
        fields = LEVEL_GRAD_FIELDS[1:]
        words += [integer(f"{f}{level}", v) for f, v in zip(fields, values, strict=True)]
    return tuple(words)


# The members of one level of the planes backward over levels (LevelPlane<T> in
# cuda/levels.cuh), one word each.
LEVEL_PLANE_FIELDS = (*LEVEL_GRAD_FIELDS, "HW", "channels_per_block", "first_block")


def planes_levels_channels(
    input_shapes: Sequence[tuple[int, int, int, int]], sizes: CudaSizes, tuning: CupyTuning
) -> tuple[int, ...]:
    """Channels per block of each level in the planes backward over levels: as many as fill
    the shared memory that ``tuning.planes_channels`` planes of the largest level take (fewer
    blocks), but at most so many that each level keeps
    ``tuning.planes_min_blocks_per_sm * multiprocessors / L`` blocks."""
    largest = max(h * w for _, _, h, w in input_shapes)
    budget = tuning.planes_channels * largest
    min_blocks = tuning.planes_min_blocks_per_sm * sizes.multiprocessors / len(input_shapes)
    per_level = []
    for num_images, channels, height, width in input_shapes:
        per_block = max(1, min(channels, budget // max(height * width, 1)))
        while per_block > 1 and num_images * math.ceil(channels / per_block) < min_blocks:
            per_block = (per_block + 1) // 2
        per_level.append(per_block)
    return tuple(per_level)


def backward_levels_kernel(
    input_shapes: Sequence[tuple[int, int, int, int]],
    input_dtype: torch.dtype,
    argmax_shape: tuple[int, ...],
    sizes: CudaSizes,
    tuning: CupyTuning = DEFAULT_TUNING,
) -> str:
    """BACKWARD_PLANES_LEVELS when every level's block of gradient planes fits in shared memory
    and there are enough blocks (as `backward_kernel` decides for one level), else
    BACKWARD_ATOMIC_LEVELS. ``tuning.backward_kernel`` forces one (BACKWARD_PLANES or
    BACKWARD_PLANES_GROUPED asks for the planes kernels, which run only where they can)."""
    num_rois, _, ph, pw = argmax_shape
    per_level = planes_levels_channels(input_shapes, sizes, tuning)
    accumulator = accumulate_dtype(input_dtype).itemsize
    largest = max(c * h * w for c, (_, _, h, w) in zip(per_level, input_shapes, strict=True))
    blocks = sum(
        n * math.ceil(channels / c)
        for c, (n, channels, _, _) in zip(per_level, input_shapes, strict=True)
    )
    num_images = input_shapes[0][0]
    can_run = (
        num_rois * ph * pw > 0
        and planes_shared(largest * accumulator, ph * pw) + PLANES_STATIC_SHARED
        <= sizes.shared_per_block_optin
        and max(per_level) * ph * pw * kernels.PLANES_THREADS[-1] < INT32_LIMIT
        and group_rois_size(num_rois, len(input_shapes), num_images) < INT32_LIMIT
        and blocks < INT32_LIMIT
    )
    if tuning.backward_kernel is not None:
        planes_kernels = (kernels.BACKWARD_PLANES, kernels.BACKWARD_PLANES_GROUPED)
        planes = tuning.backward_kernel in planes_kernels and can_run
    else:
        planes = can_run and blocks >= tuning.planes_min_blocks_per_sm * sizes.multiprocessors
    return kernels.BACKWARD_PLANES_LEVELS if planes else kernels.BACKWARD_ATOMIC_LEVELS


def level_planes(
    grad_words: tuple, grads: Sequence[torch.Tensor], per_level: Sequence[int]
) -> tuple[tuple, int]:
    """The planes backward's table of levels (LevelPlanes<T>): MAX_LEVELS * 7 named words
    (``grad_input0``, ``gi_image0``, ... ``first_block0``, ``grad_input1``, ...), the unused
    levels zero, and the number of blocks of all levels, from `grad_words` (`level_grads` of
    `grads`) and each level's channels per block. The coarsest level's blocks come first: its
    blocks hold the most channels, so the lightest blocks run last."""
    first, next_block = {}, 0
    for level in reversed(range(len(grads))):
        num_images, channels, _, _ = grads[level].shape
        first[level] = next_block
        next_block += num_images * math.ceil(channels / per_level[level])
    words = []
    step = len(LEVEL_GRAD_FIELDS)
    for level in range(kernels.MAX_LEVELS):
        words += grad_words[level * step : (level + 1) * step]
        values = (0, 0, 0)
        if level < len(grads):
            _, _, height, width = grads[level].shape
            values = (height * width, per_level[level], first[level])
        fields = LEVEL_PLANE_FIELDS[step:]
        words += [integer(f"{f}{level}", v) for f, v in zip(fields, values, strict=True)]
    return tuple(words), next_block


# The grouping kernel counts in shared memory while its L * N + 1 counters take at most this
# many bytes (else in its global buffer, with contended atomics).
GROUP_SHARED_COUNTS_BYTES = 32 * 1024


def group_rois_size(num_rois: int, num_levels: int, num_images: int) -> int:
    """Elements of the int32 buffer that `plan_group_rois` fills: K ROI indices, then the
    first position of each of the L * N (level, image) groups and their total."""
    return num_rois + num_levels * num_images + 1


def plan_group_rois(
    rois: torch.Tensor, levels: torch.Tensor | None, num_levels: int, num_images: int,
    groups: torch.Tensor,
) -> Launch:  # fmt: skip
    """The launch that lists each (level, image) group's ROIs into `groups` (one block;
    cuda/group_rois.cu), for the grouped planes backward or the planes backward over levels,
    which reads them after it on the same stream.

    Args:
        rois: the forward's (K, 5) rois, any strides (the kernel reads each batch index).
        levels: the forward's (K,) int64 levels, any stride; None for a single-level call
            (then `num_levels` is 1).
        num_levels: L; num_images: N.
        groups: int32 of `group_rois_size` (K, L, N) elements, any contents.

    The L * N + 1 counters live in shared memory while they fit in
    `GROUP_SHARED_COUNTS_BYTES`, else in `groups` itself.
    """
    counts_bytes = 4 * (num_levels * num_images + 1)
    in_shared = counts_bytes <= GROUP_SHARED_COUNTS_BYTES
    args = (
        pointer("rois", rois),
        integer("rs0", rois.stride(0)),
        pointer("levels", levels),
        integer("ls0", 0 if levels is None else levels.stride(0)),
        integer("L", num_levels),
        integer("N", num_images),
        integer("K", rois.shape[0]),
        pointer("groups", groups),
        integer("counts_in_shared", int(in_shared)),
    )
    name = kernels.group_rois_name(rois.dtype)
    shared = counts_bytes if in_shared else 0
    return Launch(name, (1, 1, 1), (kernels.GROUP_THREADS, 1, 1), shared, args)


def plan_backward_levels(
    grad_output: torch.Tensor,
    argmax: torch.Tensor,
    rois: torch.Tensor,
    levels: torch.Tensor,
    grads: Sequence[torch.Tensor],
    sizes: CudaSizes,
    tuning: CupyTuning = DEFAULT_TUNING,
    kernel: str = kernels.BACKWARD_ATOMIC_LEVELS,
    groups: torch.Tensor | None = None,
) -> Launch | None:
    """The fused backward launch of a multi-level call (None when there is nothing to add):
    the atomic kernel adding each ROI's gradients into its level's gradient, or the planes
    kernel summing each level's gradient planes in shared memory from the ROIs that
    `plan_group_rois`'s launch, queued before it, lists in `groups`.

    Args:
        grad_output: (K, C, PH, PW) of the input's dtype, any strides (zero strides too).
        argmax: contiguous int32 (K, C, PH, PW), indices into each ROI's level.
        rois: the forward's (K, 5) rois, any strides (the kernel reads each batch index).
        levels: the forward's (K,) int64 levels, any stride.
        grads: the L (at most MAX_LEVELS) gradients (N, C, H_l, W_l), each contiguous or
            channels_last: for BACKWARD_ATOMIC_LEVELS zero-filled, of `accumulate_dtype` of
            grad_output's dtype; for BACKWARD_PLANES_LEVELS of grad_output's dtype, any
            contents (every element is written).
        sizes: the device's SM count, L2 size (0: the gradients count as not cached) and the
            shared memory a block may opt in to.
        tuning: the planning constants.
        kernel: BACKWARD_ATOMIC_LEVELS or BACKWARD_PLANES_LEVELS (`backward_levels_kernel`).
        groups: for BACKWARD_PLANES_LEVELS, the int32 buffer of `plan_group_rois`.

    Raises:
        ValueError: more than MAX_LEVELS gradients; a gradient neither contiguous nor
            channels_last; BACKWARD_PLANES_LEVELS without `groups`.
    """
    num_rois, channels, ph, pw = argmax.shape
    if len(grads) > kernels.MAX_LEVELS:
        raise ValueError(
            f"grads: the fused kernels take at most {kernels.MAX_LEVELS} levels, got {len(grads)}"
        )
    table = level_grads(grads)  # checks the gradients' strides
    if argmax.numel() == 0 or all(grad.numel() == 0 for grad in grads):
        return None
    if kernel == kernels.BACKWARD_PLANES_LEVELS:
        if groups is None:
            raise ValueError(
                "groups: the planes backward over levels reads the ROIs of each (level, image) "
                "from plan_group_rois' buffer; got None"
            )
        return _plan_planes_levels(grad_output, argmax, rois, groups, grads, table, sizes, tuning)
    name = kernels.backward_name(kernels.BACKWARD_ATOMIC_LEVELS, grad_output.dtype, rois.dtype)
    grad_bytes = sum(grad.numel() * grad.element_size() for grad in grads)
    per_block = _atomic_channels_per_block(grad_bytes, num_rois, channels, ph * pw, sizes, tuning)
    args = (
        *table,
        integer("L", len(grads)),
        pointer("levels", levels),
        integer("ls0", levels.stride(0)),
        pointer("grad_output", grad_output),
        *_grad_output_strides(grad_output),
        pointer("argmax", argmax),
        pointer("rois", rois),
        integer("rs0", rois.stride(0)),
        integer("N", grads[0].shape[0]),
        integer("C", channels),
        integer("PH", ph),
        integer("PW", pw),
        integer("channels_per_block", per_block),
    )
    grid = (num_rois, _grid_y(channels, per_block), 1)
    block = (plane_threads(ph * pw), 1, 1)
    words = kernels.MAX_LEVELS * len(LEVEL_GRAD_FIELDS)
    return Launch(name, grid, block, 0, args, (words,) + (1,) * (len(args) - words))


def _plan_planes_levels(
    grad_output, argmax, rois, groups, grads, grad_words, sizes, tuning
) -> Launch:
    num_rois, channels, ph, pw = argmax.shape
    per_level = planes_levels_channels([tuple(g.shape) for g in grads], sizes, tuning)
    table, blocks = level_planes(grad_words, grads, per_level)
    accumulator = accumulate_dtype(grad_output.dtype).itemsize
    largest = max(c * g.shape[2] * g.shape[3] for c, g in zip(per_level, grads, strict=True))
    shared = planes_shared(largest * accumulator, ph * pw)
    threads = planes_threads(shared, sizes.shared_per_block_optin, tuning)
    name = kernels.backward_name(
        kernels.BACKWARD_PLANES_LEVELS, grad_output.dtype, rois.dtype, threads
    )
    args = (
        *table,
        integer("L", len(grads)),
        pointer("groups", groups),
        pointer("grad_output", grad_output),
        *_grad_output_strides(grad_output),
        pointer("argmax", argmax),
        integer("N", grads[0].shape[0]),
        integer("C", channels),
        integer("PH", ph),
        integer("PW", pw),
        integer("K", num_rois),
    )
    words = kernels.MAX_LEVELS * len(LEVEL_PLANE_FIELDS)
    return Launch(
        name, (blocks, 1, 1), (threads, 1, 1), shared, args, (words,) + (1,) * (len(args) - words)
    )
