"""The kernel table and launch plans of roi_pool.cu. Imports no CuPy.

Which template instantiations exist (one NVRTC module per device and (input, rois) dtype pair,
one per input dtype for the backward), and how a call maps to a kernel, a grid, a block, dynamic
shared memory and the argument list. `launch.py` hands a `Launch` to CuPy; the tests hand the
same `Launch` to a CPU emulator of the kernels (``tools/host_emulator.cpp``).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from roi_ops.backend import RoIPoolProblem
from roi_ops.layout import aligned_channel_vector

SOURCE_NAME = "roi_pool.cu"
# --fmad=false: no contraction into FMA anywhere (the geometry also uses _rn intrinsics).
COMPILE_OPTIONS = ("--fmad=false", "-std=c++17")
DEFINES_ENV = "ROI_OPS_CUPY_DEFINES"  # extra -D options, for tuning runs only


def compile_options() -> tuple[str, ...]:
    """NVRTC options: COMPILE_OPTIONS plus any ``-D`` options in ``ROI_OPS_CUPY_DEFINES``."""
    return _compile_options(os.environ.get(DEFINES_ENV, ""))


@functools.lru_cache(maxsize=16)
def _compile_options(defines: str) -> tuple[str, ...]:
    return COMPILE_OPTIONS + tuple(d for d in defines.split() if d.startswith("-D"))


C_TYPES: dict[torch.dtype, str] = {
    torch.float16: "roi_half",
    torch.bfloat16: "roi_bf16",
    torch.float32: "float",
    torch.float64: "double",
}
# (input dtype, rois dtype) pairs the contract allows; roi_pool.cu instantiates the same list.
FORWARD_PAIRS: tuple[tuple[torch.dtype, torch.dtype], ...] = (
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
)
BACKWARD_TYPES: tuple[torch.dtype, ...] = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)
FORWARD_KERNELS = (
    "roi_pool_forward_plane",
    "roi_pool_forward_chan",
    "roi_pool_forward_unit",
    "roi_pool_forward_cvec",
)
BACKWARD_ATOMIC = "roi_pool_backward_atomic"
BACKWARD_PLANES = "roi_pool_backward_planes"
BACKWARD_KERNELS = (BACKWARD_ATOMIC, BACKWARD_PLANES)

THREADS = 256  # the chan kernel's block, the others' largest (kThreads in roi_pool.cu)
CHAN_LANES = 32  # channels per block of the chan kernel (kChanLanes)
UNIT_CHANNELS = 4  # channels per thread and step of the unit kernel (kUnitChannels)
CHAN_MIN_CHANNELS = 16  # below this, idle lanes make the chan kernel the worse choice
CVEC_BYTES = 16  # the cvec kernel loads 16 aligned bytes of channels at a time
CVEC_THREADS = 8  # most threads per bin in a block of the cvec kernel (kCvecThreads)
MAX_CACHED_EDGES = 2048  # PH + PW up to this: the chan kernel caches bin edges (16 KiB)
TARGET_BLOCK_ELEMENTS = 2048  # outputs per block of the plane and backward kernels
# The unit kernel: large blocks amortise each thread's bin geometry over many channels when the
# input fits in L2; when it does not, small channel blocks keep the planes that the resident
# blocks read together (all ROIs of one channel block run first) small enough to stay in L2.
UNIT_BLOCK_ELEMENTS_CACHED = 8192
UNIT_BLOCK_ELEMENTS_STREAMED = 1024
MIN_BLOCKS_PER_SM = 8
# The forward kernels count a block's channels in 32-bit integers (a few thousand in practice).
MAX_CHANNELS_PER_BLOCK = 2**24
# The atomic backward: when grad_input does not fit in L2, small channel blocks keep the planes
# that the resident blocks add into (all ROIs of one channel block run first) in L2.
BACKWARD_BLOCK_ELEMENTS_STREAMED = 512
# The planes backward: one channel per block (measured fastest on the H100: 1 to 4 tried), for
# every plane that fits in a block's shared memory, and only with enough blocks (N * C of them)
# to fill the GPU; otherwise the atomic backward runs.
PLANES_CHANNELS = 1
PLANES_MIN_BLOCKS_PER_SM = 4
PLANES_STATIC_SHARED = 5 * 1024  # the kernel's own __shared__ arrays (4224 B), with room to spare
# The planes kernel's block sizes: 256 threads, or 1024 where a block's shared memory leaves room
# for no second block on the SM (a lone 256-thread block keeps too few loads in flight).
PLANES_THREADS = (256, 1024)
DEFAULT_SHARED_LIMIT = 48 * 1024  # what every CUDA device gives a block without opting in
MAX_GRID_Y = 65535
INT32_LIMIT = 2**31


@functools.cache
def source() -> str:
    """The CUDA C++ source of every kernel (read once)."""
    return resources.files("roi_ops_cupy").joinpath(SOURCE_NAME).read_text(encoding="utf-8")


def forward_name(kernel: str, input_dtype: torch.dtype, rois_dtype: torch.dtype, argmax: bool):
    """The name expression of one forward instantiation, e.g. ``k<float, float, true>``."""
    flag = "true" if argmax else "false"
    return f"{kernel}<{C_TYPES[input_dtype]}, {C_TYPES[rois_dtype]}, {flag}>"


@functools.cache
def forward_names(input_dtype: torch.dtype, rois_dtype: torch.dtype) -> tuple[str, ...]:
    """Every forward instantiation of one dtype pair: what one NVRTC module compiles."""
    return tuple(
        forward_name(kernel, input_dtype, rois_dtype, argmax)
        for kernel in FORWARD_KERNELS
        for argmax in (True, False)
    )


def backward_name(kernel: str, dtype: torch.dtype, threads: int = THREADS) -> str:
    """The name expression of backward `kernel` for gradients of `dtype`; the planes kernel's
    also names its block size (`threads`, one of PLANES_THREADS)."""
    if kernel == BACKWARD_PLANES:
        return f"{kernel}<{C_TYPES[dtype]}, {threads}>"
    return f"{kernel}<{C_TYPES[dtype]}>"


@functools.cache
def backward_names(dtype: torch.dtype) -> tuple[str, ...]:
    """Every backward instantiation for `dtype`: what one NVRTC module compiles."""
    return (backward_name(BACKWARD_ATOMIC, dtype),) + tuple(
        backward_name(BACKWARD_PLANES, dtype, threads) for threads in PLANES_THREADS
    )


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the backward accumulates `dtype` gradients in (float32 for half types)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Launch:
    """One kernel launch: every argument is 8 bytes (pointers, int64, double)."""

    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    args: tuple[np.generic, ...]


def _pointer(tensor: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if tensor is None else tensor.data_ptr())


def _ints(*values: int) -> tuple[np.int64, ...]:
    return tuple(np.int64(v) for v in values)


def _channels_per_block(
    num_rois: int, channels: int, bins: int, multiprocessors: int, target: int
) -> int:
    """Channels per block: ~`target` outputs, but enough blocks for the GPU.

    ``ROI_OPS_CUPY_BLOCK_ELEMENTS`` overrides the target, for tuning.
    """
    target = int(os.environ.get("ROI_OPS_CUPY_BLOCK_ELEMENTS", target))
    per_block = max(1, min(channels, target // bins, MAX_CHANNELS_PER_BLOCK))
    while per_block > 1 and num_rois * math.ceil(channels / per_block) < (
        MIN_BLOCKS_PER_SM * multiprocessors
    ):
        per_block = (per_block + 1) // 2
    return per_block


def _whole_unit_steps(per_block: int, bins: int, dtype: torch.dtype) -> int:
    """`per_block` rounded down to whole steps of the unit kernel's threads (a step covers
    kUnitChannels channels, half for float64, in each of the block's groups of `bins` threads),
    so that no step reads channels it does not store. A tuning build with another
    ROI_OPS_UNIT_CHANNELS only makes this rounding less apt, never wrong."""
    channels = UNIT_CHANNELS // 2 if dtype == torch.float64 else UNIT_CHANNELS
    step = channels * (THREADS // bins if bins <= THREADS else 1)
    return per_block // step * step if per_block >= step else per_block


def _cvec_channels_per_block(
    num_rois: int, channels: int, dtype: torch.dtype, multiprocessors: int
) -> int:
    """The cvec kernel's channels per block: a thread's channels times a power of two of threads
    per bin, at most CVEC_THREADS (fewer when C has fewer channels, or when the GPU would get
    too few blocks)."""
    per_thread = cvec_thread_channels(dtype)
    threads = 1
    while threads < CVEC_THREADS and threads * per_thread < channels:
        threads *= 2
    while threads > 1 and num_rois * math.ceil(channels / (threads * per_thread)) < (
        MIN_BLOCKS_PER_SM * multiprocessors
    ):
        threads //= 2
    return threads * per_thread


def plane_threads(bins: int) -> int:
    """Block size of the plane and backward kernels: whole groups of `bins` threads (as many as
    fit in 256), rounded up to a warp; 256 when one group does not fit."""
    if bins > THREADS:
        return THREADS
    return -(-(THREADS // bins) * bins // 32) * 32


def unsupported_reasons(problem: RoIPoolProblem) -> list[str]:
    """Size and dtype limits of these kernels (beyond what roi_ops validates)."""
    reasons = []
    pair = (problem.input.dtype, problem.rois.dtype)
    if pair not in FORWARD_PAIRS and problem.input.dtype in C_TYPES:
        names = [str(d).removeprefix("torch.") for d in pair]
        reasons.append(f"input dtype {names[0]} with rois dtype {names[1]} not supported")
    bins = problem.pooled_height * problem.pooled_width
    if bins >= INT32_LIMIT - THREADS:
        reasons.append(f"output_size with {bins} bins per ROI (needs fewer than 2^31 - 256)")
    if problem.num_rois >= INT32_LIMIT:
        reasons.append(f"{problem.num_rois} ROIs (needs fewer than 2^31: one grid row each)")
    return reasons


def uses_channel_kernel(input: torch.Tensor) -> bool:
    """Whether lanes should run over channels: channels adjacent in memory (channels_last)."""
    return input.shape[1] >= CHAN_MIN_CHANNELS and input.stride(1) == 1 and input.stride(3) != 1


def cvec_lanes(dtype: torch.dtype) -> int:
    """Channels in one of the cvec kernel's 16-byte vectors (4 float32, 8 float16, 2 float64)."""
    return CVEC_BYTES // dtype.itemsize


def cvec_thread_channels(dtype: torch.dtype) -> int:
    """Channels of one cvec thread (CvecShape::kChannels): two vectors for float32 and float64,
    one for the 16-bit types (8 channels in all but float64's 4)."""
    lanes = cvec_lanes(dtype)
    return lanes if lanes == 8 else 2 * lanes


def forward_kernel(input: torch.Tensor) -> str:
    """The forward kernel for an input's strides and alignment (no device sync).

    For channels_last: cvec when its channel vectors are 16-byte aligned, chan otherwise; unit
    for any other unit W stride (NCHW contiguous), plane otherwise. ``ROI_OPS_CUPY_KERNEL=
    plane|chan`` forces one of those two, for tuning and tests.
    """
    forced = os.environ.get("ROI_OPS_CUPY_KERNEL", "").strip()
    if forced in ("plane", "chan"):
        return f"roi_pool_forward_{forced}"
    if uses_channel_kernel(input):
        aligned = aligned_channel_vector(input, CVEC_BYTES) > 1
        return "roi_pool_forward_cvec" if aligned else "roi_pool_forward_chan"
    if input.stride(3) == 1:
        return "roi_pool_forward_unit"
    return "roi_pool_forward_plane"


def plan_forward(
    problem: RoIPoolProblem,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
    multiprocessors: int,
    l2_bytes: int = 0,
) -> Launch | None:
    """The forward launch for `problem` (None when the output is empty).

    Args:
        problem: the validated call; input and rois may have any strides.
        output: contiguous (K, C, PH, PW) tensor of the input's dtype.
        argmax: contiguous int32 tensor of the same shape, or None to skip the argmax.
        multiprocessors: the device's SM count (sizes the channel blocks).
        l2_bytes: the device's L2 cache size (0 if unknown: inputs count as not cached).
    """
    input, rois = problem.input, problem.rois
    num_images, channels, height, width = input.shape
    ph, pw = problem.pooled_height, problem.pooled_width
    num_rois = problem.num_rois
    if output.numel() == 0:
        return None
    with_argmax = argmax is not None
    head = (
        _pointer(input),
        *_ints(num_images, channels, height, width, *input.stride()),
        _pointer(rois),
        *_ints(*rois.stride()),
        np.float64(problem.spatial_scale),
        *_ints(ph, pw),
    )
    tail = (_pointer(output), _pointer(argmax))
    kernel = forward_kernel(input)
    if kernel == "roi_pool_forward_chan":
        cache_edges = ph + pw <= MAX_CACHED_EDGES
        name = forward_name("roi_pool_forward_chan", input.dtype, rois.dtype, with_argmax)
        grid_y = min(math.ceil(channels / CHAN_LANES), MAX_GRID_Y)
        return Launch(
            name,
            (num_rois, grid_y, 1),
            (CHAN_LANES, THREADS // CHAN_LANES, 1),
            8 * (ph + pw) if cache_edges else 0,
            head + _ints(int(cache_edges)) + tail,
        )
    if kernel == "roi_pool_forward_cvec":
        per_block = _cvec_channels_per_block(num_rois, channels, input.dtype, multiprocessors)
        name = forward_name(kernel, input.dtype, rois.dtype, with_argmax)
        grid_y = min(math.ceil(channels / per_block), MAX_GRID_Y)
        return Launch(
            name, (num_rois, grid_y, 1), (THREADS, 1, 1), 0, head + _ints(per_block) + tail
        )
    target = TARGET_BLOCK_ELEMENTS
    if kernel == "roi_pool_forward_unit":
        input_bytes = num_images * channels * height * width * input.element_size()
        cached = input_bytes <= l2_bytes
        target = UNIT_BLOCK_ELEMENTS_CACHED if cached else UNIT_BLOCK_ELEMENTS_STREAMED
    per_block = _channels_per_block(num_rois, channels, ph * pw, multiprocessors, target)
    if kernel == "roi_pool_forward_unit":
        per_block = _whole_unit_steps(per_block, ph * pw, input.dtype)
    name = forward_name(kernel, input.dtype, rois.dtype, with_argmax)
    grid_y = min(math.ceil(channels / per_block), MAX_GRID_Y)
    return Launch(name, (num_rois, grid_y, 1), (THREADS, 1, 1), 0, head + _ints(per_block) + tail)


def backward_kernel(
    input_shape: tuple[int, int, int, int],
    input_dtype: torch.dtype,
    argmax_shape: tuple[int, ...],
    multiprocessors: int,
    shared_limit: int = DEFAULT_SHARED_LIMIT,
) -> str:
    """BACKWARD_PLANES when a block's gradient planes fit in shared memory and there are enough
    (image, channel) blocks, else BACKWARD_ATOMIC. ``ROI_OPS_CUPY_BACKWARD=atomic|planes``
    forces one (planes only where it can run), for tuning and tests.

    Args:
        input_shape: (N, C, H, W); input_dtype: the gradient's dtype.
        argmax_shape: (K, C, PH, PW).
        multiprocessors: the device's SM count.
        shared_limit: the most shared memory a block may use (opted in), in bytes.
    """
    num_images, channels, height, width = input_shape
    num_rois, _, ph, pw = argmax_shape
    plane_bytes = PLANES_CHANNELS * height * width * accumulate_dtype(input_dtype).itemsize
    can_run = (
        num_rois * ph * pw > 0  # with nothing to add, grad_input is the atomic path's zero fill
        and _planes_shared(plane_bytes, ph * pw) + PLANES_STATIC_SHARED <= shared_limit
        and PLANES_CHANNELS * ph * pw * PLANES_THREADS[-1] < INT32_LIMIT
        and num_rois < INT32_LIMIT
        and num_images * math.ceil(channels / PLANES_CHANNELS) < INT32_LIMIT
    )
    forced = os.environ.get("ROI_OPS_CUPY_BACKWARD", "").strip()
    if forced in ("atomic", "planes"):
        return BACKWARD_PLANES if forced == "planes" and can_run else BACKWARD_ATOMIC
    enough_blocks = num_images * channels >= PLANES_MIN_BLOCKS_PER_SM * multiprocessors
    if can_run and enough_blocks:
        return BACKWARD_PLANES
    return BACKWARD_ATOMIC


# A channels_last input's gradient: the backward kernels write it channels_last themselves only
# while it fits in L2. Beyond L2, the planes kernel's channel-strided stores leave partial
# sectors to be written back, and a contiguous gradient plus torch's copy is faster (H100,
# channels_last queued bench, fwd+bwd: fpn-p2 float32 2.98 ms against 1.96); within L2 the copy
# is the larger cost (frcnn-c4 float32 0.389 ms against 0.476).
GRADIENT_LAYOUT_ENV = "ROI_OPS_CUPY_GRADIENT_LAYOUT"


def channels_last_gradient(grad_input_bytes: int, l2_bytes: int) -> bool:
    """Whether the backward writes a channels_last input's gradient channels_last (else
    contiguous, which roi_ops copies): when the `grad_input_bytes` it writes fit in `l2_bytes`.
    ``ROI_OPS_CUPY_GRADIENT_LAYOUT=channels_last|contiguous`` forces one, for tuning and tests."""
    forced = os.environ.get(GRADIENT_LAYOUT_ENV, "").strip()
    if forced in ("channels_last", "contiguous"):
        return forced == "channels_last"
    return grad_input_bytes <= l2_bytes


def planes_threads(shared_mem: int, shared_limit: int) -> int:
    """Block size of the planes kernel for `shared_mem` bytes of dynamic shared memory per block:
    1024 when two blocks would not fit in `shared_limit` (the opt-in limit of one block, about
    an SM's shared memory), else 256. ``ROI_OPS_CUPY_PLANES_THREADS=256|1024`` forces one."""
    forced = os.environ.get("ROI_OPS_CUPY_PLANES_THREADS", "").strip()
    if forced in {str(threads) for threads in PLANES_THREADS}:
        return int(forced)
    alone = 2 * (shared_mem + PLANES_STATIC_SHARED) > shared_limit
    return PLANES_THREADS[-1] if alone else PLANES_THREADS[0]


def _planes_shared(plane_bytes: int, bins: int) -> int:
    """Dynamic shared memory of the planes kernel: the bins' offset table, then the planes."""
    return 8 * bins + plane_bytes


def plan_backward(
    grad_output: torch.Tensor,
    argmax: torch.Tensor,
    batch_index: torch.Tensor,
    grad_input: torch.Tensor,
    multiprocessors: int,
    l2_bytes: int = 0,
    kernel: str = BACKWARD_ATOMIC,
    shared_limit: int = DEFAULT_SHARED_LIMIT,
) -> Launch | None:
    """The backward launch (None when there is nothing to launch).

    Args:
        grad_output: (K, C, PH, PW) of the input's dtype, any strides (zero strides too).
        argmax: contiguous int32 (K, C, PH, PW).
        batch_index: (K,) int64, each in [0, N).
        grad_input: (N, C, H, W), contiguous or channels_last: for BACKWARD_ATOMIC zero-filled, of
            `accumulate_dtype(grad_output.dtype)`; for BACKWARD_PLANES of grad_output's dtype,
            any contents (every element is written).
        multiprocessors: the device's SM count.
        l2_bytes: the device's L2 cache size (0 if unknown: grad_input counts as not cached).
        kernel: BACKWARD_ATOMIC or BACKWARD_PLANES (see `backward_kernel`).
        shared_limit: the most shared memory a block may use (opted in), in bytes: picks the
            planes kernel's block size (see `planes_threads`).
    """
    num_rois, channels, ph, pw = argmax.shape
    if grad_input.numel() == 0 or (argmax.numel() == 0 and kernel == BACKWARD_ATOMIC):
        return None
    num_images, _, height, width = grad_input.shape
    image_stride, channel_stride, row_stride, pixel_stride = grad_input.stride()
    if row_stride != width * pixel_stride and height > 1:  # kernels index pixels h * W + w
        raise ValueError(
            f"grad_input's H stride must be W times its W stride (contiguous or channels_last), "
            f"got strides {grad_input.stride()} for shape {tuple(grad_input.shape)}"
        )
    grad_input_strides = _ints(image_stride, channel_stride, pixel_stride)
    head = (
        _pointer(grad_output),
        *_ints(*grad_output.stride()),
        _pointer(argmax),
        _pointer(batch_index),
        *_ints(batch_index.stride(0), channels, height * width, ph, pw),
    )
    if kernel == BACKWARD_PLANES:
        if argmax.numel() == 0:
            raise ValueError("the planes backward needs at least one ROI and one bin")
        per_block = PLANES_CHANNELS
        blocks = num_images * math.ceil(channels / per_block)
        accumulator = accumulate_dtype(grad_input.dtype).itemsize
        shared = _planes_shared(per_block * height * width * accumulator, ph * pw)
        threads = planes_threads(shared, shared_limit)
        name = backward_name(kernel, grad_output.dtype, threads)
        args = head + _ints(per_block) + (_pointer(grad_input),) + grad_input_strides
        args += _ints(num_rois)
        return Launch(name, (blocks, 1, 1), (threads, 1, 1), shared, args)
    name = backward_name(kernel, grad_output.dtype)
    grad_bytes = grad_input.numel() * grad_input.element_size()
    target = TARGET_BLOCK_ELEMENTS if grad_bytes <= l2_bytes else BACKWARD_BLOCK_ELEMENTS_STREAMED
    per_block = _channels_per_block(num_rois, channels, ph * pw, multiprocessors, target)
    grid_y = min(math.ceil(channels / per_block), MAX_GRID_Y)
    args = head + _ints(per_block) + (_pointer(grad_input),) + grad_input_strides
    block = (plane_threads(ph * pw), 1, 1)
    return Launch(name, (num_rois, grid_y, 1), block, 0, args)
