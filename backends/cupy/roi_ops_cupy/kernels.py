"""The kernel table: the CUDA source, its template instantiations and the `Launch` record.

Imports no CuPy. The source is a shared header plus one file per kernel family (``cuda/``),
joined in a fixed order into one NVRTC source that includes nothing. One NVRTC module holds a
(input, rois) dtype pair's forward instantiations, another an input dtype's backward ones; the
fused multi-level kernels (``*_levels``, one launch for every pyramid level) have modules of their
own, compiled on the first multi-level call.
`roi_ops_cupy.planning` maps a call to a `Launch`; `roi_ops_cupy.launch` hands it to CuPy, and
the tests hand the same `Launch` to a CPU emulator of the kernels (``tools/emulator.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

# The header first, then one file per kernel family; joined in this order.
SOURCE_FILES = (
    "common.cuh",
    "geometry.cuh",  # the ROIs' arithmetic, bins and bad-ROI log
    "levels.cuh",  # the multi-level kernels' table of levels
    "forward_plane.cu",
    "forward_chan.cu",
    "forward_unit.cu",
    "forward_small.cu",  # reuses forward_unit.cu's per-bin reduction
    "forward_cvec.cu",
    "forward_small_cvec.cu",  # reuses forward_small.cu's table and forward_cvec.cu's cvec_bin
    "backward_atomic.cu",
    "backward_planes.cu",
    "group_rois.cu",  # each (level, image)'s ROIs, for the planes backward over levels
    "copy_channels_last.cu",  # the staged forward's copy (forward_cvec.cu's TileBits)
    "max_tables.cu",  # the cvec inference's tables of maxima (forward_cvec.cu's PackedMax)
)
# --fmad=false: no contraction into FMA anywhere (the geometry also uses _rn intrinsics).
COMPILE_OPTIONS = ("--fmad=false", "-std=c++17")

C_TYPES: dict[torch.dtype, str] = {
    torch.float16: "roi_half",
    torch.bfloat16: "roi_bf16",
    torch.float32: "float",
    torch.float64: "double",
}
# (input dtype, rois dtype) pairs the contract allows; the backward kernels take the same pairs
# (they read each ROI's batch index from the rois).
FORWARD_PAIRS: tuple[tuple[torch.dtype, torch.dtype], ...] = (
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
)

FORWARD_PLANE = "roi_pool_forward_plane"
FORWARD_CHAN = "roi_pool_forward_chan"
FORWARD_UNIT = "roi_pool_forward_unit"
FORWARD_CVEC = "roi_pool_forward_cvec"
# The cvec kernel with four vectors a thread in float32 (planning.cvec_wide).
FORWARD_CVEC_WIDE = "roi_pool_forward_cvec_wide"
FORWARD_SMALL = "roi_pool_forward_small"
FORWARD_SMALL_CVEC = "roi_pool_forward_small_cvec"
FORWARD_KERNELS = (
    FORWARD_PLANE,
    FORWARD_CHAN,
    FORWARD_UNIT,
    FORWARD_CVEC,
    FORWARD_CVEC_WIDE,
    FORWARD_SMALL,
    FORWARD_SMALL_CVEC,
)
# The fused multi-level kernel of each forward kernel: the same work per ROI, on the map of the
# ROI's pyramid level (a table of at most MAX_LEVELS maps passed by value).
LEVELS_SUFFIX = "_levels"
MAX_LEVELS = 8  # kMaxLevels in cuda/common.cuh
BACKWARD_ATOMIC = "roi_pool_backward_atomic"
BACKWARD_PLANES = "roi_pool_backward_planes"
# The planes kernel reading each image's ROIs from GROUP_ROIS' list (takes no rois).
BACKWARD_PLANES_GROUPED = "roi_pool_backward_planes_grouped"
BACKWARD_KERNELS = (BACKWARD_ATOMIC, BACKWARD_PLANES, BACKWARD_PLANES_GROUPED)
BACKWARD_ATOMIC_LEVELS = BACKWARD_ATOMIC + LEVELS_SUFFIX
BACKWARD_PLANES_LEVELS = BACKWARD_PLANES + LEVELS_SUFFIX
# The planes kernel's block sizes (its kBlock template argument).
PLANES_THREADS = (256, 1024)
# Lists each (level, image)'s ROIs before the grouped planes backward and the planes backward
# over levels (one NVRTC module, every rois dtype); one block of GROUP_THREADS threads
# (kGroupThreads).
GROUP_ROIS = "roi_ops_group_rois"
GROUP_THREADS = 1024
# The staged forward's copy of an NCHW input to channels_last (one NVRTC module, every dtype).
COPY_CHANNELS_LAST = "roi_ops_copy_channels_last"
COPY_ROWS = 8  # kCopyRows: the copy's blocks are 32 x COPY_ROWS threads
COPY_POSITIONS = 64  # kCopyPositions: positions (h * W + w) a block of the copy moves


# The cvec inference's tables of maxima (cuda/max_tables.cu; one NVRTC module, every dtype):
# the count of the reads they save (at most TABLE_SAVINGS_BLOCKS blocks of TABLE_SAVINGS_THREADS
# threads, every rois dtype), then the decision and build (blocks of TABLE_THREADS threads, each
# thread TABLE_ROWS rows of one 16-byte channel vector).
TABLE_SAVINGS = "roi_ops_table_savings"
MAX_TABLES = "roi_ops_max_tables"
TABLE_SAVINGS_THREADS = 256
TABLE_SAVINGS_BLOCKS = 64
TABLE_THREADS = 256
TABLE_ROWS = 16
# The input dtypes with tables (the cvec inference's max.NaN reduction).
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def copy_channels(dtype: torch.dtype) -> int:
    """CopyTile<T>::kChannels: a block of the channels_last copy moves 128 bytes of channels
    (32 float32, 64 float16 or bfloat16, 16 float64) of COPY_POSITIONS positions."""
    return 128 // dtype.itemsize


@functools.cache
def source() -> str:
    """The CUDA C++ source of every kernel: `SOURCE_FILES` joined (read once)."""
    folder = resources.files("roi_ops_cupy").joinpath("cuda")
    parts = [folder.joinpath(name).read_text(encoding="utf-8") for name in SOURCE_FILES]
    return "\n".join(parts)


def forward_name(
    kernel: str, input_dtype: torch.dtype, rois_dtype: torch.dtype, argmax: bool
) -> str:
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


def levels_kernel(kernel: str) -> str:
    """The fused multi-level kernel of forward `kernel` (one of FORWARD_KERNELS)."""
    return kernel + LEVELS_SUFFIX


@functools.cache
def forward_levels_names(input_dtype: torch.dtype, rois_dtype: torch.dtype) -> tuple[str, ...]:
    """Every fused multi-level forward instantiation of one dtype pair (one NVRTC module)."""
    return tuple(
        forward_name(levels_kernel(kernel), input_dtype, rois_dtype, argmax)
        for kernel in FORWARD_KERNELS
        for argmax in (True, False)
    )


def backward_name(
    kernel: str, dtype: torch.dtype, rois_dtype: torch.dtype, threads: int = PLANES_THREADS[0]
) -> str:
    """The name expression of backward `kernel` for gradients of `dtype` and rois of
    `rois_dtype`; the planes kernels' also name their block size (one of PLANES_THREADS), and
    the grouped one, which reads no rois, names no rois dtype."""
    if kernel == BACKWARD_PLANES_GROUPED:
        return f"{kernel}<{C_TYPES[dtype]}, {threads}>"
    types = f"{C_TYPES[dtype]}, {C_TYPES[rois_dtype]}"
    if kernel in (BACKWARD_PLANES, BACKWARD_PLANES_LEVELS):
        return f"{kernel}<{types}, {threads}>"
    return f"{kernel}<{types}>"


@functools.cache
def backward_names(dtype: torch.dtype) -> tuple[str, ...]:
    """Every backward instantiation for gradients of `dtype` (each rois dtype paired with it):
    what one NVRTC module compiles."""
    names = []
    for input_dtype, rois_dtype in FORWARD_PAIRS:
        if input_dtype == dtype:
            names.append(backward_name(BACKWARD_ATOMIC, dtype, rois_dtype))
            names += [backward_name(BACKWARD_PLANES, dtype, rois_dtype, t) for t in PLANES_THREADS]
    names += [backward_name(BACKWARD_PLANES_GROUPED, dtype, dtype, t) for t in PLANES_THREADS]
    return tuple(names)


@functools.cache
def backward_levels_names(dtype: torch.dtype) -> tuple[str, ...]:
    """Every fused multi-level backward instantiation for gradients of `dtype` (one NVRTC
    module)."""
    names = []
    for input_dtype, rois_dtype in FORWARD_PAIRS:
        if input_dtype == dtype:
            names.append(backward_name(BACKWARD_ATOMIC_LEVELS, dtype, rois_dtype))
            names += [
                backward_name(BACKWARD_PLANES_LEVELS, dtype, rois_dtype, threads)
                for threads in PLANES_THREADS
            ]
    return tuple(names)


def copy_name(dtype: torch.dtype) -> str:
    """The name expression of the channels_last copy of `dtype` elements."""
    return f"{COPY_CHANNELS_LAST}<{C_TYPES[dtype]}>"


@functools.cache
def copy_names() -> tuple[str, ...]:
    """Every instantiation of the channels_last copy (one NVRTC module)."""
    return tuple(copy_name(dtype) for dtype in C_TYPES)


def table_savings_name(rois_dtype: torch.dtype) -> str:
    """The name expression of the tables' count of saved reads for rois of `rois_dtype`."""
    return f"{TABLE_SAVINGS}<{C_TYPES[rois_dtype]}>"


def max_tables_name(dtype: torch.dtype) -> str:
    """The name expression of the tables' build for maps of `dtype` (one of TABLE_DTYPES)."""
    return f"{MAX_TABLES}<{C_TYPES[dtype]}>"


@functools.cache
def table_names() -> tuple[str, ...]:
    """Every instantiation of the tables' count and build (one NVRTC module)."""
    counts = tuple(table_savings_name(dtype) for dtype in C_TYPES)
    return counts + tuple(max_tables_name(dtype) for dtype in TABLE_DTYPES)


def group_rois_name(rois_dtype: torch.dtype) -> str:
    """The name expression of the ROI grouping kernel for rois of `rois_dtype`."""
    return f"{GROUP_ROIS}<{C_TYPES[rois_dtype]}>"


@functools.cache
def group_rois_names() -> tuple[str, ...]:
    """Every instantiation of the ROI grouping kernel (one NVRTC module)."""
    return tuple(group_rois_name(dtype) for dtype in C_TYPES)


def module_names(name: str) -> tuple[str, ...]:
    """The names compiled in one NVRTC module together with kernel `name`."""
    types = {v: k for k, v in C_TYPES.items()}
    kernel, arguments = name[: name.index("<")], name[name.index("<") + 1 : -1].split(", ")
    if kernel == COPY_CHANNELS_LAST:
        return copy_names()
    if kernel == GROUP_ROIS:
        return group_rois_names()
    if kernel in (TABLE_SAVINGS, MAX_TABLES):
        return table_names()
    first = types[arguments[0]]
    levels = kernel.endswith(LEVELS_SUFFIX)
    if kernel.startswith("roi_pool_forward"):
        pair = (first, types[arguments[1]])
        return forward_levels_names(*pair) if levels else forward_names(*pair)
    return backward_levels_names(first) if levels else backward_names(first)


def all_names() -> tuple[str, ...]:
    """Every instantiation the backend may ask NVRTC for."""
    forward = [n for pair in FORWARD_PAIRS for n in forward_names(*pair)]
    forward += [n for pair in FORWARD_PAIRS for n in forward_levels_names(*pair)]
    backward = [n for dtype in C_TYPES for n in backward_names(dtype)]
    backward += [n for dtype in C_TYPES for n in backward_levels_names(dtype)]
    return tuple(forward + backward) + group_rois_names() + copy_names() + table_names()


Arg = tuple[str, np.generic]


@dataclass(frozen=True)
class Launch:
    """One kernel launch. Every argument is 8 bytes (np.uint64 pointers, np.int64 integers,
    np.float64) and is named as the kernel's parameter; the launch finds the pointers it swaps
    by name. A kernel parameter that is a struct passed by value (the multi-level kernels' level
    tables, every member 8 bytes) is a run of named words: `param_words` gives the words of each
    kernel parameter in order (empty: one word each)."""

    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    args: tuple[Arg, ...]
    param_words: tuple[int, ...] = ()

    def words(self) -> np.ndarray:
        """The arguments as uint64 words, in order."""
        return np.array([np.asarray(v).view(np.uint64) for _, v in self.args], np.uint64)

    def param_offsets(self) -> tuple[int, ...]:
        """The index of each kernel parameter's first word (what cuLaunchKernel's kernelParams
        point at).

        Raises:
            ValueError: `param_words` does not add up to the arguments' words.
        """
        if not self.param_words:
            return tuple(range(len(self.args)))
        if sum(self.param_words) != len(self.args):
            raise ValueError(
                f"{self.name}: param_words add up to {sum(self.param_words)} words, "
                f"the arguments have {len(self.args)}"
            )
        offsets, at = [], 0
        for count in self.param_words:
            offsets.append(at)
            at += count
        return tuple(offsets)

    def position(self, name: str) -> int:
        """The index of argument `name`. Raises KeyError when the kernel has none."""
        for index, (arg_name, _) in enumerate(self.args):
            if arg_name == name:
                return index
        raise KeyError(f"{self.name} has no argument {name!r}")

    def value(self, name: str) -> int | float:
        """The value of argument `name` as a Python int or float."""
        return self.args[self.position(name)][1].item()


def pointer(name: str, tensor: torch.Tensor | None) -> Arg:
    """A pointer argument (0 for None)."""
    return (name, np.uint64(0 if tensor is None else tensor.data_ptr()))


def integer(name: str, value: int) -> Arg:
    """A 64-bit integer argument."""
    return (name, np.int64(value))


def real(name: str, value: float) -> Arg:
    """A double argument."""
    return (name, np.float64(value))
