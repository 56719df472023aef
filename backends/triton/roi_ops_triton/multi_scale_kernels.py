"""The fused multi-level (FPN) kernels: every ROI of every pyramid level in one launch.

The forward kernels are the single-level unit and channels_last kernels (`forward.unit_pool`,
`forward.channels_last_pool`) with each program's level read from roi_ops' (K,) int64 level
tensor and that level's pointer, shape, strides and scale picked among up to `MAX_LEVELS`
argument sets: row k is computed exactly as the single-level kernel computes it on its level,
bit for bit. A row of level -1 (no level) is pooled as an invalid ROI (zeros, argmax -1); it is
recorded in the bad-ROI log only if the ROI itself is invalid, as the single-level kernels do.

The backward scatters grad_output into the gradient of each row's level with atomic adds, as
`backward.roi_pool_backward_scatter` does for one level (not run-to-run deterministic).

Each level's arguments, after the shared ones, are

    H_l, W_l, s_n_l, s_c_l, s_h_l, s_w_l, scale_f32_l, scale_bits_l       (forward)
    s_gn_l, s_gc_l, s_gi_l                                                 (backward)

for l < MAX_LEVELS; ``LEVELS`` (a constexpr) says how many are real, the others repeat level 0's
and are never picked. Shapes and strides are ``do_not_specialize`` runtime arguments.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .backward import gradient_block
from .device import program_roi, roi_image
from .forward import channels_last_pool, unit_pool
from .plan import MAX_LEVELS

_LEVEL_FORWARD = [
    f"{name}{level}"
    for level in range(MAX_LEVELS)
    for name in ("H", "W", "s_n", "s_c", "s_h", "s_w", "scale_bits")
]
FORWARD_RUNTIME = ["N", "C", "PH", "PW", *_LEVEL_FORWARD, "blk_offset"]


@triton.jit
def pick(level, v0, v1, v2, v3, v4, LEVELS: tl.constexpr):
    """v_level for `level` in [1, LEVELS), else v0 (level 0, and -1: no level)."""
    value = v0
    if LEVELS > 1:
        value = tl.where(level == 1, v1, value)
    if LEVELS > 2:
        value = tl.where(level == 2, v2, value)
    if LEVELS > 3:
        value = tl.where(level == 3, v3, value)
    if LEVELS > 4:
        value = tl.where(level == 4, v4, value)
    return value


@triton.jit
def _level_roi(
    levels_ptr, rois_ptr, log_ptr, N, PH, PW, s_rk, s_rj, blk_offset,
    sf0, sf1, sf2, sf3, sf4, sb0, sb1, sb2, sb3, sb4,
    LEVELS: tl.constexpr, GEOM_HALF: tl.constexpr, GEOM_F64: tl.constexpr,
    REPORT_BAD: tl.constexpr,
):  # fmt: skip
    """This program's level and its ROI's geometry on that level's scale (`program_roi`), with
    `valid` False for a row of no level as well."""
    level = tl.load(levels_ptr + tl.program_id(0).to(tl.int64))
    scale_f32 = pick(level, sf0, sf1, sf2, sf3, sf4, LEVELS)
    scale_bits = pick(level, sb0, sb1, sb2, sb3, sb4, LEVELS)
    k, blk, valid, batch, x1, y1, bin_h, bin_w = program_roi(
        rois_ptr, s_rk, s_rj, N, PH, PW, scale_f32, scale_bits, blk_offset, log_ptr,
        GEOM_HALF, GEOM_F64, REPORT_BAD,
    )  # fmt: skip
    return level, k, blk, valid & (level >= 0), batch, x1, y1, bin_h, bin_w


@triton.jit(do_not_specialize=[*FORWARD_RUNTIME, "chan_per_prog"])
def roi_pool_forward_unit_levels(
    inp0, inp1, inp2, inp3, inp4, rois_ptr, levels_ptr, out_ptr, arg_ptr, log_ptr,
    N, C, PH, PW, s_rk, s_rj,
    H0, W0, s_n0, s_c0, s_h0, s_w0, sf0, scale_bits0,
    H1, W1, s_n1, s_c1, s_h1, s_w1, sf1, scale_bits1,
    H2, W2, s_n2, s_c2, s_h2, s_w2, sf2, scale_bits2,
    H3, W3, s_n3, s_c3, s_h3, s_w3, sf3, scale_bits3,
    H4, W4, s_n4, s_c4, s_h4, s_w4, sf4, scale_bits4,
    blk_offset, chan_per_prog,
    GEOM_HALF: tl.constexpr, GEOM_F64: tl.constexpr, ACC_F64: tl.constexpr,
    LEVELS: tl.constexpr, LANES: tl.constexpr, CHANNELS: tl.constexpr,
    NEEDS_ARGMAX: tl.constexpr, REPORT_BAD: tl.constexpr,
):  # fmt: skip
    """`forward.roi_pool_forward_unit` over every level (unit W strides): program (k, blk)
    pools channels [blk * chan_per_prog, ...) of ROI k from the level levels[k] names."""
    level, k, blk, valid, batch, x1, y1, bin_h, bin_w = _level_roi(
        levels_ptr, rois_ptr, log_ptr, N, PH, PW, s_rk, s_rj, blk_offset,
        sf0, sf1, sf2, sf3, sf4, scale_bits0, scale_bits1, scale_bits2, scale_bits3,
        scale_bits4, LEVELS, GEOM_HALF, GEOM_F64, REPORT_BAD,
    )  # fmt: skip
    inp_ptr = pick(level, inp0, inp1, inp2, inp3, inp4, LEVELS)
    H = pick(level, H0, H1, H2, H3, H4, LEVELS)
    W = pick(level, W0, W1, W2, W3, W4, LEVELS)
    s_n = pick(level, s_n0, s_n1, s_n2, s_n3, s_n4, LEVELS)
    s_c = pick(level, s_c0, s_c1, s_c2, s_c3, s_c4, LEVELS)
    s_h = pick(level, s_h0, s_h1, s_h2, s_h3, s_h4, LEVELS)
    unit_pool(
        inp_ptr + tl.where(valid, batch, 0) * s_n, out_ptr, arg_ptr, k, blk, valid, x1, y1,
        bin_h, bin_w, C, H, W, PH, PW, s_c, s_h, chan_per_prog,
        GEOM_HALF, GEOM_F64, ACC_F64, LANES, CHANNELS, NEEDS_ARGMAX,
    )  # fmt: skip


@triton.jit(do_not_specialize=FORWARD_RUNTIME)
def roi_pool_forward_channels_last_levels(
    inp0, inp1, inp2, inp3, inp4, rois_ptr, levels_ptr, out_ptr, arg_ptr, log_ptr,
    N, C, PH, PW, s_rk, s_rj,
    H0, W0, s_n0, s_c0, s_h0, s_w0, sf0, scale_bits0,
    H1, W1, s_n1, s_c1, s_h1, s_w1, sf1, scale_bits1,
    H2, W2, s_n2, s_c2, s_h2, s_w2, sf2, scale_bits2,
    H3, W3, s_n3, s_c3, s_h3, s_w3, sf3, scale_bits3,
    H4, W4, s_n4, s_c4, s_h4, s_w4, sf4, scale_bits4,
    blk_offset,
    GEOM_HALF: tl.constexpr, GEOM_F64: tl.constexpr, ACC_F64: tl.constexpr,
    LEVELS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, VEC: tl.constexpr,
    EVEN_C: tl.constexpr, C_UNIT: tl.constexpr,
    NEEDS_ARGMAX: tl.constexpr, REPORT_BAD: tl.constexpr,
):  # fmt: skip
    """`forward.roi_pool_forward_channels_last` over every level (VEC: every level's bins
    start VEC-element aligned; C_UNIT: every level has a unit C stride)."""
    level, k, blk, valid, batch, x1, y1, bin_h, bin_w = _level_roi(
        levels_ptr, rois_ptr, log_ptr, N, PH, PW, s_rk, s_rj, blk_offset,
        sf0, sf1, sf2, sf3, sf4, scale_bits0, scale_bits1, scale_bits2, scale_bits3,
        scale_bits4, LEVELS, GEOM_HALF, GEOM_F64, REPORT_BAD,
    )  # fmt: skip
    channels_last_pool(
        pick(level, inp0, inp1, inp2, inp3, inp4, LEVELS), out_ptr, arg_ptr, k, blk, valid,
        batch, x1, y1, bin_h, bin_w, C,
        pick(level, H0, H1, H2, H3, H4, LEVELS), pick(level, W0, W1, W2, W3, W4, LEVELS),
        PH, PW,
        pick(level, s_n0, s_n1, s_n2, s_n3, s_n4, LEVELS),
        pick(level, s_c0, s_c1, s_c2, s_c3, s_c4, LEVELS),
        pick(level, s_h0, s_h1, s_h2, s_h3, s_h4, LEVELS),
        pick(level, s_w0, s_w1, s_w2, s_w3, s_w4, LEVELS),
        GEOM_HALF, GEOM_F64, ACC_F64, BLOCK_C, BLOCK_B, VEC, EVEN_C, C_UNIT, NEEDS_ARGMAX,
    )  # fmt: skip


@triton.jit(
    do_not_specialize=[
        "N", "C", "PH", "PW", "s_k", "s_c", "s_h", "s_w",
        *[f"{name}{level}" for level in range(MAX_LEVELS) for name in ("s_gn", "s_gc", "s_gi")],
        "blk_offset",
    ]
)  # fmt: skip
def roi_pool_backward_scatter_levels(
    grad_out_ptr, arg_ptr, rois_ptr, levels_ptr, grad0, grad1, grad2, grad3, grad4,
    N, C, PH, PW, s_k, s_c, s_h, s_w, s_rk,
    s_gn0, s_gc0, s_gi0, s_gn1, s_gc1, s_gi1, s_gn2, s_gc2, s_gi2, s_gn3, s_gc3, s_gi3,
    s_gn4, s_gc4, s_gi4,
    blk_offset,
    ROIS_F64: tl.constexpr, ACC_F64: tl.constexpr, BLOCK: tl.constexpr, LEVELS: tl.constexpr,
):  # fmt: skip
    """Program (k, blk) adds block blk of grad_output[k] into the gradient of ROI k's level,
    of image trunc(rois[k, 0]) (clamped into [0, N)), at element ``image * s_gn + channel *
    s_gc + argmax * s_gi`` (dense (N, C, H, W): (C * H * W, H * W, 1); dense (N, H, W, C):
    (H * W * C, 1, C)); -1 and rows of no level add nothing."""
    k = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) + blk_offset
    chan, index, hit, grad = gradient_block(
        grad_out_ptr, arg_ptr, k, blk, C, PH, PW, s_k, s_c, s_h, s_w, ACC_F64, BLOCK
    )
    level = tl.load(levels_ptr + k)
    batch = roi_image(rois_ptr, k, s_rk, N, ROIS_F64)
    s_gn = pick(level, s_gn0, s_gn1, s_gn2, s_gn3, s_gn4, LEVELS)
    s_gc = pick(level, s_gc0, s_gc1, s_gc2, s_gc3, s_gc4, LEVELS)
    s_gi = pick(level, s_gi0, s_gi1, s_gi2, s_gi3, s_gi4, LEVELS)
    plane = pick(level, grad0, grad1, grad2, grad3, grad4, LEVELS) + batch * s_gn
    dst = plane + chan * s_gc + index.to(tl.int64) * s_gi
    in_level = tl.zeros([BLOCK], tl.int64) + level >= 0  # a tensor: the interpreter wants one
    tl.atomic_add(dst, grad, mask=hit & in_level, sem="relaxed")
