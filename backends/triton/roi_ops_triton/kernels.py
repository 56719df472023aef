"""Triton kernels for roi_pool and the host code that launches them.

Importing this module imports Triton and defines (does not compile) the kernels; whether they run
compiled or under the interpreter is decided here, at import, by ``TRITON_INTERPRET``.

Design (see the package README for the reasoning):

* One program per (ROI, block of outputs). Grid axis 0 is the ROI, so programs that run at the
  same time share a block of channels and read the same feature planes (L2 reuse); axis 1 is the
  block of outputs of that ROI.
* Each lane of a program owns one output element (channel, bin) and scans its own bin; a
  program's bins all come from one ROI, so they differ in size by at most a row or column (or are
  cut by the map border), and the loop runs to the largest bin of the program with masks.
* Three kernels, chosen per call by the input strides:
  - unit (a unit W stride, NCHW): each lane owns one bin and reduces four channels of it;
  - channels_last (a unit C stride): a [bins, channels] tile whose loads are contiguous along C
    (16-byte vectors when aligned); Triton converts the layout for the (bins-contiguous) store;
  - flat (any other strides): lanes walk the contiguous (C, PH, PW) output block of the ROI, so
    stores are fully coalesced; SPLIT lanes may share a bin and read SPLIT adjacent columns,
    then a (value, index) reduction merges them.
* Geometry is computed in the kernel per ROI and per bin, exactly as docs/contract.md says:
  float16 geometry is carried in float32 and rounded to half after every operation, float32
  division is ``tl.math.div_rn`` (Triton's ``/`` is approximate on GPUs), float64 is native, and
  kernels are launched with ``enable_fp_fusion=False`` so that no multiply is fused into an add.
* NaN tests look at the bits: Triton compiles with no-NaNs FP math, so ``x != x`` may be folded.
* Only dtypes, block sizes, layout flags and the argmax flag are compile-time constants. Shapes
  and strides are runtime arguments marked ``do_not_specialize``, so new K, N, C, H or W do not
  recompile (a value passing 2^31 still selects a 64-bit variant).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct

import torch
import triton
import triton.language as tl

from roi_ops.layout import aligned_channel_vector

from . import launcher

INDEX_LIMIT = tl.constexpr(1099511627776.0)  # 2**40: the contract's index() saturation bound

MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1; larger launches are split


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _is_nan(x, F64: tl.constexpr):
    # On the bits: Triton's code generator assumes no NaNs, so `x != x` may fold to False.
    if x.dtype == tl.float16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF) > 0x7C00
    elif F64:
        bits = x.to(tl.int64, bitcast=True)
        return (bits & 0x7FFFFFFFFFFFFFFF) > 0x7FF0000000000000
    else:
        bits = x.to(tl.int32, bitcast=True)
        return (bits & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def _is_finite(x, F64: tl.constexpr):
    if F64:
        bits = x.to(tl.int64, bitcast=True)
        return (bits & 0x7FF0000000000000) != 0x7FF0000000000000
    else:
        bits = x.to(tl.int32, bitcast=True)
        return (bits & 0x7F800000) != 0x7F800000


@triton.jit
def _to_geom(x, HALF: tl.constexpr):
    # float16 geometry is carried in float32; round to half after every operation.
    if HALF:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _c_round(v):
    # C round (halves away from zero). v - trunc(v) is exact because fp fusion is off.
    # Infinities give inf on both branches; NaN stays NaN (index() maps it to 0).
    pos = v >= 0.0
    t = tl.where(pos, tl.math.floor(v), tl.math.ceil(v))
    frac = tl.abs(v - t)
    return tl.where(frac >= 0.5, tl.where(pos, t + 1.0, t - 1.0), t)


@triton.jit
def _index(v, F64: tl.constexpr):
    # The contract's index(v): NaN -> 0, saturate to [-2^40, 2^40], then a 64-bit integer.
    v = tl.where(_is_nan(v, F64), 0.0, v)
    v = tl.where(v > INDEX_LIMIT, INDEX_LIMIT, v)
    v = tl.where(v < -INDEX_LIMIT, -INDEX_LIMIT, v)
    return v.to(tl.int64)


@triton.jit
def _widen(x, F64: tl.constexpr):
    # Exact conversion of a loaded value to the working type. bfloat16 goes through its bits
    # (what the hardware conversion does), which also sidesteps the interpreter's conversion
    # that flushes bfloat16 subnormals.
    if F64:
        return x.to(tl.float64)
    elif x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _value(x, F64: tl.constexpr, INTERP: tl.constexpr):
    """A loaded feature value in the type the reduction compares. Compiled kernels keep float16
    as it is (PTX compares it natively, so the winner is stored with the bits it was loaded
    with: a float32 round trip would turn every NaN into the canonical one); otherwise the
    exact `_widen`."""
    if INTERP:
        return _widen(x, F64)
    elif x.dtype == tl.float16:
        return x
    else:
        return _widen(x, F64)


@triton.jit
def _narrow(x, dtype: tl.constexpr):
    # Back to the storage dtype; exact here because every value came from that dtype (or is 0).
    if dtype == tl.bfloat16:
        return (x.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _corner(coord, scale, HALF: tl.constexpr, F64: tl.constexpr):
    return _index(_c_round(_to_geom(coord * scale, HALF)), F64)


@triton.jit
def _bin_size(roi_size, pooled, HALF: tl.constexpr, F64: tl.constexpr):
    if F64:
        # float64 division is always correctly rounded (PTX has no approximate one).
        return roi_size.to(tl.float64) / tl.cast(pooled, tl.float64)
    else:
        num = _to_geom(roi_size.to(tl.float32), HALF)
        den = _to_geom(tl.cast(pooled, tl.float32), HALF)
        # Correctly rounded in float32; for half geometry, rounding that to half is the correctly
        # rounded half quotient (float32 has more than 2 * 11 + 2 bits).
        return _to_geom(tl.math.div_rn(num, den), HALF)


@triton.jit
def _roi_geometry(
    rois_ptr, k, s_rk, s_rj, N, PH, PW, scale_f32, scale_bits, HALF: tl.constexpr, F64: tl.constexpr
):
    """(valid, batch, x1, y1, bin_h, bin_w) of ROI k; batch/x1/y1 are int64."""
    row = rois_ptr + k.to(tl.int64) * s_rk
    r0 = _widen(tl.load(row), F64)
    r1 = _widen(tl.load(row + s_rj), F64)
    r2 = _widen(tl.load(row + 2 * s_rj), F64)
    r3 = _widen(tl.load(row + 3 * s_rj), F64)
    r4 = _widen(tl.load(row + 4 * s_rj), F64)
    if F64:
        scale = tl.cast(tl.cast(scale_bits, tl.int64), tl.float64, bitcast=True)
    else:
        scale = _to_geom(tl.cast(scale_f32, tl.float32), HALF)
    finite = _is_finite(r0, F64) & _is_finite(r1, F64) & _is_finite(r2, F64)
    finite = finite & _is_finite(r3, F64) & _is_finite(r4, F64)
    batch = _index(tl.where(r0 >= 0.0, tl.math.floor(r0), tl.math.ceil(r0)), F64)
    valid = finite & (batch >= 0) & (batch < N)
    x1 = _corner(r1, scale, HALF, F64)
    y1 = _corner(r2, scale, HALF, F64)
    x2 = _corner(r3, scale, HALF, F64)
    y2 = _corner(r4, scale, HALF, F64)
    bin_w = _bin_size(tl.maximum(x2 - x1 + 1, 1), PW, HALF, F64)
    bin_h = _bin_size(tl.maximum(y2 - y1 + 1, 1), PH, HALF, F64)
    return valid, batch, x1, y1, bin_h, bin_w


@triton.jit
def _bin_edges(p, bin_size, corner, limit, HALF: tl.constexpr, F64: tl.constexpr):
    """[start, end) along one axis for bin indices p (int32 tensor), clamped to [0, limit]."""
    if F64:
        lo = p.to(tl.float64)
        hi = (p + 1).to(tl.float64)
    else:
        lo = _to_geom(p.to(tl.float32), HALF)
        hi = _to_geom((p + 1).to(tl.float32), HALF)
    start = _index(tl.math.floor(_to_geom(lo * bin_size, HALF)), F64) + corner
    end = _index(tl.math.ceil(_to_geom(hi * bin_size, HALF)), F64) + corner
    start = tl.minimum(tl.maximum(start, 0), limit)
    end = tl.minimum(tl.maximum(end, 0), limit)
    return start.to(tl.int32), end.to(tl.int32)


# Compiled kernels compare with PTX (no flush of subnormals, NaN handled by the predicate); the
# interpreter, which cannot run PTX, uses the bit tests.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def _replaces(x, best, F64: tl.constexpr, INTERP: tl.constexpr):
    """x replaces best as the first maximum: x > best, or x is NaN, and best is not NaN."""
    if INTERP:
        return ~_is_nan(best, F64) & (_is_nan(x, F64) | (x > best))
    elif x.dtype == tl.float16:
        flag = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gtu.f16 p, $1, $2; setp.num.and.f16 p, $2, $2, p; "
            "selp.u32 $0, 1, 0, p; }",
            "=r,h,h",
            [x, best],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        return flag != 0
    elif F64:
        flag = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gtu.f64 p, $1, $2; setp.num.and.f64 p, $2, $2, p; "
            "selp.u32 $0, 1, 0, p; }",
            "=r,d,d",
            [x, best],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        return flag != 0
    else:
        flag = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gtu.f32 p, $1, $2; setp.num.and.f32 p, $2, $2, p; "
            "selp.u32 $0, 1, 0, p; }",
            "=r,f,f",
            [x, best],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        return flag != 0


@triton.jit
def _second_wins(a, ia, b, ib, F64: tl.constexpr):
    # Contract order: NaN above all, then value, then the smaller (earlier) index; -1 = nothing.
    na = _is_nan(a, F64)
    nb = _is_nan(b, F64)
    better = ~na & (nb | (b > a))
    tie = (na & nb) | (~na & ~nb & (a == b))
    return (ia < 0) | ((ib >= 0) & (better | (tie & (ib < ia))))


@triton.jit
def _first_max_f32(a, ia, b, ib):
    second = _second_wins(a, ia, b, ib, False)
    return tl.where(second, b, a), tl.where(second, ib, ia)


@triton.jit
def _first_max_f64(a, ia, b, ib):
    second = _second_wins(a, ia, b, ib, True)
    return tl.where(second, b, a), tl.where(second, ib, ia)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


# The forward kernels' runtime arguments that Triton must not specialise (new shapes would
# recompile otherwise).
_FORWARD_RUNTIME = ["N", "C", "H", "W", "PH", "PW", "s_n", "s_c", "s_h", "scale_bits", "blk_offset"]


@triton.jit(do_not_specialize=[*_FORWARD_RUNTIME, "s_w"])
def _roi_pool_fwd_kernel(
    inp_ptr,
    rois_ptr,
    out_ptr,
    arg_ptr,
    N,
    C,
    H,
    W,
    PH,
    PW,
    s_n,
    s_c,
    s_h,
    s_w,
    s_rk,
    s_rj,
    scale_f32,
    scale_bits,
    blk_offset,
    GEOM_HALF: tl.constexpr,
    GEOM_F64: tl.constexpr,
    ACC_F64: tl.constexpr,
    W_UNIT: tl.constexpr,
    C_UNIT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    SPLIT: tl.constexpr,
    TRACK_INDEX: tl.constexpr,
    NEEDS_ARGMAX: tl.constexpr,
):
    k = tl.program_id(0)
    blk = tl.program_id(1) + blk_offset
    phpw = PH * PW
    valid, batch, x1, y1, bin_h, bin_w = _roi_geometry(
        rois_ptr, k, s_rk, s_rj, N, PH, PW, scale_f32, scale_bits, GEOM_HALF, GEOM_F64
    )

    # Which (channel, bin) each lane owns. chan2 is int64, [1, BLOCK_B].
    lanes = tl.arange(0, BLOCK_B)
    first = blk.to(tl.int64) * BLOCK_B
    c0 = first // phpw
    local = (first - c0 * phpw).to(tl.int32) + lanes
    bins = local % phpw
    chan2 = (c0 + local // phpw)[None, :]
    lane_ok = chan2 < C

    # Bin edges, per lane (int32, clamped to the map); bh = bw = 0 for empty bins and bad ROIs.
    ph = bins // PW
    pw = bins - ph * PW
    hs, he = _bin_edges(ph, bin_h, y1, H, GEOM_HALF, GEOM_F64)
    ws, we = _bin_edges(pw, bin_w, x1, W, GEOM_HALF, GEOM_F64)
    filled = valid & (he > hs) & (we > ws) & (bins < phpw)
    bh = tl.where(filled, he - hs, 0)
    bw = tl.where(filled, we - ws, 0)
    max_bh = tl.max(bh, 0)
    max_bw = tl.max(bw, 0)

    # 64-bit element offsets of each lane's first pixel; invalid ROIs never load (bh = 0).
    batch = tl.where(valid, batch, 0)
    if C_UNIT:
        plane = batch * s_n + chan2
    else:
        plane = batch * s_n + chan2 * s_c
    if W_UNIT:
        corner = hs.to(tl.int64) * s_h + ws.to(tl.int64)
    else:
        corner = hs.to(tl.int64) * s_h + ws.to(tl.int64) * s_w
    row_ptr = inp_ptr + (plane + corner[None, :])[:, :, None]
    row_index = (hs * W + ws)[None, :, None]
    chan_ok = lane_ok[:, :, None]
    bh3 = bh[None, :, None]
    bw3 = bw[None, :, None]
    split = tl.arange(0, SPLIT)[None, None, :]

    lowest = tl.full([1, BLOCK_B, SPLIT], float("-inf"), inp_ptr.dtype.element_ty)
    best = _value(lowest, ACC_F64, INTERPRETED)
    best_index = tl.full([1, BLOCK_B, SPLIT], -1, tl.int32)

    # Rows outer, columns inner: each lane sees its elements in increasing h * W + w order, so a
    # strict comparison keeps the first maximum.
    for i in range(0, max_bh):
        row_ok = chan_ok & (i < bh3)
        for j0 in range(0, max_bw, SPLIT):
            j = j0 + split
            mask = row_ok & (j < bw3)
            if W_UNIT:
                ptrs = row_ptr + j
            else:
                ptrs = row_ptr + j.to(tl.int64) * s_w
            x = _value(tl.load(ptrs, mask=mask, other=0.0), ACC_F64, INTERPRETED)
            take = mask & _replaces(x, best, ACC_F64, INTERPRETED)
            if TRACK_INDEX:
                take = take | (mask & (best_index < 0))
                best_index = tl.where(take, row_index + j, best_index)
            best = tl.where(take, x, best)
        row_ptr += s_h
        row_index += W

    if SPLIT > 1:
        if ACC_F64:
            best, best_index = tl.reduce((best, best_index), 2, _first_max_f64)
        else:
            best, best_index = tl.reduce((best, best_index), 2, _first_max_f32)
    else:
        best = tl.reshape(best, [1, BLOCK_B])
        best_index = tl.reshape(best_index, [1, BLOCK_B])

    filled2 = filled[None, :]
    offsets = k.to(tl.int64) * C * phpw + chan2 * phpw + bins[None, :]
    value = _narrow(tl.where(filled2, best, 0.0), out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, value, mask=lane_ok)
    if NEEDS_ARGMAX:
        tl.store(arg_ptr + offsets, tl.where(filled2, best_index, -1), mask=lane_ok)


@triton.jit
def _unit_update(x, best, at, cand, F64: tl.constexpr, INTERP: tl.constexpr, TRACK: tl.constexpr):
    """(best, at) after element x at bin offset cand: x replaces best when it is greater, or NaN
    while best is not (the contract's first maximum for a scan in increasing offset order)."""
    if INTERP:
        take = ~_is_nan(best, F64) & (_is_nan(x, F64) | (x > best))
        if TRACK:
            at = tl.where(take, cand, at)
        return tl.where(take, x, best), at
    elif TRACK:
        if x.dtype == tl.float16:
            return tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gtu.f16 p, $2, $3; setp.num.and.f16 p, $3, $3, p; "
                "selp.b16 $0, $2, $3, p; selp.b32 $1, $5, $4, p; }",
                "=h,=r,h,h,r,r",
                [x, best, at, cand],
                dtype=(tl.float16, tl.int32),
                is_pure=True,
                pack=1,
            )
        elif F64:
            return tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gtu.f64 p, $2, $3; setp.num.and.f64 p, $3, $3, p; "
                "selp.f64 $0, $2, $3, p; selp.b32 $1, $5, $4, p; }",
                "=d,=r,d,d,r,r",
                [x, best, at, cand],
                dtype=(tl.float64, tl.int32),
                is_pure=True,
                pack=1,
            )
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gtu.f32 p, $2, $3; setp.num.and.f32 p, $3, $3, p; "
                "selp.f32 $0, $2, $3, p; selp.b32 $1, $5, $4, p; }",
                "=f,=r,f,f,r,r",
                [x, best, at, cand],
                dtype=(tl.float32, tl.int32),
                is_pure=True,
                pack=1,
            )
    elif x.dtype == tl.float16:
        best = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gtu.f16 p, $1, $2; setp.num.and.f16 p, $2, $2, p; "
            "selp.b16 $0, $1, $2, p; }",
            "=h,h,h",
            [x, best],
            dtype=tl.float16,
            is_pure=True,
            pack=1,
        )
        return best, at
    elif F64:
        best = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gtu.f64 p, $1, $2; setp.num.and.f64 p, $2, $2, p; "
            "selp.f64 $0, $1, $2, p; }",
            "=d,d,d",
            [x, best],
            dtype=tl.float64,
            is_pure=True,
            pack=1,
        )
        return best, at
    else:
        best = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gtu.f32 p, $1, $2; setp.num.and.f32 p, $2, $2, p; "
            "selp.f32 $0, $1, $2, p; }",
            "=f,f,f",
            [x, best],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
        return best, at


@triton.jit
def _clamped_bins(bins, ok, valid, x1, y1, bin_h, bin_w, H, W, PW, GEOM_HALF: tl.constexpr,
                  GEOM_F64: tl.constexpr):  # fmt: skip
    """Each lane's bin for scans clamped into it (the unit and channels_last kernels):
    (filled, first row, first column, last row offset, last column offset). Empty bins, bad
    ROIs and lanes that are not `ok` become element 0 of the image, 1 x 1 (in bounds), and store
    nothing they read (filled is False)."""
    ph = bins // PW
    pw = bins - ph * PW
    hs, he = _bin_edges(ph, bin_h, y1, H, GEOM_HALF, GEOM_F64)
    ws, we = _bin_edges(pw, bin_w, x1, W, GEOM_HALF, GEOM_F64)
    filled = valid & (he > hs) & (we > ws) & ok
    last_row = tl.where(filled, he - hs, 1) - 1
    last_col = tl.where(filled, we - ws, 1) - 1
    return filled, tl.where(filled, hs, 0), tl.where(filled, ws, 0), last_row, last_col


@triton.jit
def _unit_store(out_ptr, arg_ptr, offsets, ok, filled, best, at, first_index,
                NEEDS_ARGMAX: tl.constexpr):  # fmt: skip
    value = _narrow(tl.where(filled, best, 0.0), out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, value, mask=ok, cache_modifier=".cs")
    if NEEDS_ARGMAX:
        index = tl.where(filled, first_index + at, -1)
        tl.store(arg_ptr + offsets, index, mask=ok, cache_modifier=".cs")


@triton.jit(do_not_specialize=[*_FORWARD_RUNTIME, "chan_per_prog"])
def _roi_pool_fwd_unit_kernel(
    inp_ptr,
    rois_ptr,
    out_ptr,
    arg_ptr,
    N,
    C,
    H,
    W,
    PH,
    PW,
    s_n,
    s_c,
    s_h,
    s_rk,
    s_rj,
    scale_f32,
    scale_bits,
    blk_offset,
    chan_per_prog,
    GEOM_HALF: tl.constexpr,
    GEOM_F64: tl.constexpr,
    ACC_F64: tl.constexpr,
    LANES: tl.constexpr,
    NEEDS_ARGMAX: tl.constexpr,
):
    """Unit W stride: each lane owns one bin (its edges in registers) and reduces four channels
    of it at once, sharing addresses, loop bounds and the argmax offset between them.

    Program (k, blk) covers channels [blk * chan_per_prog, ...) of ROI k. Lanes form `groups`
    groups of `span` bins; lane (g, b) takes channels c0 + u * groups + g (u = 0..3) of bin b, so
    for each u the lanes' outputs are contiguous. Loops run to the program's largest bin with
    each lane's row and column clamped into its own bin: a re-read element is equal to one seen
    before and never replaces it, so no load is masked.
    """
    k = tl.program_id(0)
    blk = tl.program_id(1) + blk_offset
    phpw = PH * PW
    valid, batch, x1, y1, bin_h, bin_w = _roi_geometry(
        rois_ptr, k, s_rk, s_rj, N, PH, PW, scale_f32, scale_bits, GEOM_HALF, GEOM_F64
    )
    span = tl.minimum(phpw, LANES)
    groups = LANES // span
    lanes = tl.arange(0, LANES)
    lane_group = lanes // span
    lane_bin = lanes - lane_group * span
    c_start = blk.to(tl.int64) * chan_per_prog
    c_end = tl.minimum(c_start + chan_per_prog, C)
    image = inp_ptr + tl.where(valid, batch, 0) * s_n
    out_roi = k.to(tl.int64) * C * phpw
    for b0 in range(0, phpw, span):
        bins = b0 + lane_bin
        lane_ok = (lane_group < groups) & (bins < phpw)
        filled, hs, ws, last_row, last_col = _clamped_bins(
            bins, lane_ok, valid, x1, y1, bin_h, bin_w, H, W, PW, GEOM_HALF, GEOM_F64
        )
        max_bh = tl.max(last_row, 0) + 1
        max_bw = tl.max(last_col, 0) + 1
        corner = hs.to(tl.int64) * s_h + ws
        first_index = hs * W + ws
        for c0 in range(c_start, c_end, 4 * groups):
            ch0 = c0 + lane_group
            ch1 = ch0 + groups
            ch2 = ch1 + groups
            ch3 = ch2 + groups
            # Channels past the program's end are read from channel c0 and never stored.
            p0 = image + (tl.where(ch0 < c_end, ch0, c0) * s_c + corner)
            p1 = image + (tl.where(ch1 < c_end, ch1, c0) * s_c + corner)
            p2 = image + (tl.where(ch2 < c_end, ch2, c0) * s_c + corner)
            p3 = image + (tl.where(ch3 < c_end, ch3, c0) * s_c + corner)
            best0 = _value(tl.load(p0), ACC_F64, INTERPRETED)
            best1 = _value(tl.load(p1), ACC_F64, INTERPRETED)
            best2 = _value(tl.load(p2), ACC_F64, INTERPRETED)
            best3 = _value(tl.load(p3), ACC_F64, INTERPRETED)
            at0 = tl.zeros([LANES], tl.int32)
            at1 = at0
            at2 = at0
            at3 = at0
            row = tl.zeros([LANES], tl.int32)  # (row - hs) * W of the current row
            for i in range(0, max_bh):
                for j in range(0, max_bw):
                    jj = tl.minimum(last_col, j)
                    cand = row + jj
                    x = _value(tl.load(p0 + jj), ACC_F64, INTERPRETED)
                    best0, at0 = _unit_update(x, best0, at0, cand, ACC_F64, INTERPRETED,
                                              NEEDS_ARGMAX)  # fmt: skip
                    x = _value(tl.load(p1 + jj), ACC_F64, INTERPRETED)
                    best1, at1 = _unit_update(x, best1, at1, cand, ACC_F64, INTERPRETED,
                                              NEEDS_ARGMAX)  # fmt: skip
                    x = _value(tl.load(p2 + jj), ACC_F64, INTERPRETED)
                    best2, at2 = _unit_update(x, best2, at2, cand, ACC_F64, INTERPRETED,
                                              NEEDS_ARGMAX)  # fmt: skip
                    x = _value(tl.load(p3 + jj), ACC_F64, INTERPRETED)
                    best3, at3 = _unit_update(x, best3, at3, cand, ACC_F64, INTERPRETED,
                                              NEEDS_ARGMAX)  # fmt: skip
                advance = i < last_row
                p0 += tl.where(advance, s_h, 0)
                p1 += tl.where(advance, s_h, 0)
                p2 += tl.where(advance, s_h, 0)
                p3 += tl.where(advance, s_h, 0)
                row += tl.where(advance, W, 0)
            base = out_roi + c0 * phpw + lane_group * phpw + bins
            step = groups * phpw
            _unit_store(out_ptr, arg_ptr, base, lane_ok & (ch0 < c_end), filled, best0, at0,
                        first_index, NEEDS_ARGMAX)  # fmt: skip
            _unit_store(out_ptr, arg_ptr, base + step, lane_ok & (ch1 < c_end), filled, best1,
                        at1, first_index, NEEDS_ARGMAX)  # fmt: skip
            _unit_store(out_ptr, arg_ptr, base + 2 * step, lane_ok & (ch2 < c_end), filled,
                        best2, at2, first_index, NEEDS_ARGMAX)  # fmt: skip
            _unit_store(out_ptr, arg_ptr, base + 3 * step, lane_ok & (ch3 < c_end), filled,
                        best3, at3, first_index, NEEDS_ARGMAX)  # fmt: skip


@triton.jit(do_not_specialize=[*_FORWARD_RUNTIME, "s_w"])
def _roi_pool_fwd_cl_kernel(
    inp_ptr,
    rois_ptr,
    out_ptr,
    arg_ptr,
    N,
    C,
    H,
    W,
    PH,
    PW,
    s_n,
    s_c,
    s_h,
    s_w,
    s_rk,
    s_rj,
    scale_f32,
    scale_bits,
    blk_offset,
    GEOM_HALF: tl.constexpr,
    GEOM_F64: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    VEC: tl.constexpr,
    EVEN_C: tl.constexpr,
    C_UNIT: tl.constexpr,
    NEEDS_ARGMAX: tl.constexpr,
):
    """Unit C stride (channels_last; C_UNIT, any other C stride runs too, for tests): a
    [BLOCK_B bins, BLOCK_C channels] tile; each element of a bin is read for BLOCK_C adjacent
    channels at once, as 16-byte vectors when the launcher has checked that every bin's first
    channel is VEC-element aligned (VEC > 1).

    Program (k, blk) covers one block of bins and one block of channels of ROI k. As in the unit
    kernel, loops run to the program's largest bin with each bin's row and column clamped into
    the bin (a re-read element never replaces the maximum), so no load is masked; channels past
    C read channel C - 1 unless C is a multiple of BLOCK_C (EVEN_C), and are never stored.
    Offsets are recomputed at every element (no loop-carried pointer), so the alignment hint
    holds for every load. Triton converts the tile's layout for the bin-contiguous stores.
    """
    k = tl.program_id(0)
    blk = tl.program_id(1) + blk_offset
    phpw = PH * PW
    valid, batch, x1, y1, bin_h, bin_w = _roi_geometry(
        rois_ptr, k, s_rk, s_rj, N, PH, PW, scale_f32, scale_bits, GEOM_HALF, GEOM_F64
    )
    bin_blocks = tl.cdiv(phpw, BLOCK_B)
    bins = (blk % bin_blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
    chan = (blk // bin_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    bin_ok = bins < phpw
    filled, hs, ws, last_row, last_col = _clamped_bins(
        bins, bin_ok, valid, x1, y1, bin_h, bin_w, H, W, PW, GEOM_HALF, GEOM_F64
    )
    max_bh = tl.max(last_row, 0) + 1
    max_bw = tl.max(last_col, 0) + 1
    if EVEN_C:
        chan_read = chan[None, :]
    else:
        chan_read = tl.minimum(chan, C - 1)[None, :]
    if not C_UNIT:
        chan_read = chan_read * s_c
    base = tl.where(valid, batch, 0) * s_n + hs.to(tl.int64) * s_h + ws.to(tl.int64) * s_w
    first = base
    if VEC > 1:
        first = tl.multiple_of(first, VEC)
    best = _value(tl.load(inp_ptr + first[:, None] + chan_read), ACC_F64, INTERPRETED)
    at = tl.zeros([BLOCK_B, BLOCK_C], tl.int32)
    for i in range(0, max_bh):
        ii = tl.minimum(last_row, i)
        for j in range(0, max_bw):
            jj = tl.minimum(last_col, j)
            offset = base + ii.to(tl.int64) * s_h + jj.to(tl.int64) * s_w
            if VEC > 1:
                offset = tl.multiple_of(offset, VEC)
            x = _value(tl.load(inp_ptr + offset[:, None] + chan_read), ACC_F64, INTERPRETED)
            cand = tl.broadcast_to((ii * W + jj)[:, None], [BLOCK_B, BLOCK_C])
            best, at = _unit_update(x, best, at, cand, ACC_F64, INTERPRETED, NEEDS_ARGMAX)
    offsets = k.to(tl.int64) * C * phpw + chan[None, :] * phpw + bins[:, None]
    ok = bin_ok[:, None] & (chan < C)[None, :]
    _unit_store(out_ptr, arg_ptr, offsets, ok, filled[:, None], best, at,
                (hs * W + ws)[:, None], NEEDS_ARGMAX)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Backward (scatter with atomics; only used outside deterministic mode)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["C", "HW", "PH", "PW", "s_k", "s_c", "s_h", "s_w", "blk_offset"])
def _roi_pool_bwd_kernel(
    grad_out_ptr,
    arg_ptr,
    batch_ptr,
    grad_in_ptr,
    C,
    HW,
    PH,
    PW,
    s_k,
    s_c,
    s_h,
    s_w,
    blk_offset,
    ACC_F64: tl.constexpr,
    BLOCK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) + blk_offset
    phpw = PH * PW
    first = blk.to(tl.int64) * BLOCK
    c0 = first // phpw
    local = (first - c0 * phpw).to(tl.int32) + tl.arange(0, BLOCK)
    chan = c0 + local // phpw
    bins = local % phpw
    ph = bins // PW
    pw = bins - ph * PW
    ok = chan < C
    index = tl.load(arg_ptr + k * C * phpw + first + tl.arange(0, BLOCK), mask=ok, other=-1)
    hit = ok & (index >= 0)
    g_off = k * s_k + chan * s_c + ph.to(tl.int64) * s_h + pw.to(tl.int64) * s_w
    grad = _widen(tl.load(grad_out_ptr + g_off, mask=hit, other=0.0), ACC_F64)
    batch = tl.load(batch_ptr + k)
    if CHANNELS_LAST:  # grad_input is dense (N, H, W, C)
        dst = grad_in_ptr + (batch * HW + index) * C + chan
    else:
        dst = grad_in_ptr + (batch * C + chan) * HW + index
    tl.atomic_add(dst, grad, mask=hit, sem="relaxed")


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Launch parameters of the forward kernel (see `forward_config`)."""

    channels_fast: bool
    block_c: int
    block_b: int  # lanes of the unit kernel
    split: int
    num_warps: int
    unit: bool = False  # the unit kernel (unit W stride): four channels of a bin per lane
    block_elements: int = 0  # the unit kernel's target outputs per program (0: by L2 fit)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _env_overrides(name: str) -> dict[str, int]:
    """Parse ``NAME=key=value,key=value`` (integers) for tuning runs; empty when unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return {}
    overrides = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        overrides[key.strip()] = int(value)
    return overrides


def forward_config(input: torch.Tensor, pooled_height: int, pooled_width: int) -> ForwardConfig:
    """Pick tile sizes for one call from the input's shape, strides and dtype (no device sync).

    The values that depend on runtime shapes are bounded (block sizes are capped), so shape changes
    select among a few compiled variants instead of recompiling.
    ``ROI_OPS_TRITON_FWD="block_b=256,split=4,num_warps=8"`` overrides fields, for tuning.
    """
    channels = input.shape[1]
    s_c, s_w = input.stride(1), input.stride(3)
    bins = pooled_height * pooled_width
    if s_c == 1 and s_w != 1 and channels >= 8:
        # The channels_last kernel: 128 bytes of channels by up to 64 bins on 4 warps.
        block_c = min(_pow2_ceil(channels), 128 // input.element_size())
        block_b = min(_pow2_ceil(bins), CL_BINS)
        config = ForwardConfig(True, block_c, block_b, 1, CL_WARPS)
    elif s_w == 1:
        config = ForwardConfig(False, 1, UNIT_LANES, 1, UNIT_WARPS, unit=True)
    else:
        # One lane per bin (split 1): splitting a bin's columns over lanes, sized from the map
        # width, was measured 1.0-2.6x slower on every H100 workload, whose ROIs are much
        # narrower than the map (scripts/gpu_probe.py, triton:default vs triton:split1).
        # 512 lanes per program: 4 per thread (ILP).
        block_b = min(512, _pow2_ceil(channels * bins))
        config = ForwardConfig(False, 1, max(16, block_b), 1, 4)
    overrides = _env_overrides("ROI_OPS_TRITON_FWD")
    if overrides:
        if not overrides.get("unit", 1) and config.unit:  # back to the flat tile, for probes
            block_b = min(512, _pow2_ceil(channels * bins))
            config = ForwardConfig(False, 1, max(16, block_b), 1, 4)
        config = dataclasses.replace(config, **overrides)
        if config.channels_fast:
            config = dataclasses.replace(config, split=1, unit=False)
        elif config.unit:
            config = dataclasses.replace(config, block_c=1, split=1)
        else:
            config = dataclasses.replace(config, block_c=1)
    return config


# The channels_last kernel's tile: 128 bytes of channels by up to CL_BINS bins, on CL_WARPS
# warps. Measured on the H100 (kernel times, queued, with argmax / inference, float32 and
# float16): 64 bins on 4 warps against 2048-element tiles on 8 warps: fpn-p4 0.515/0.465 against
# 0.558/0.523 ms and 0.479/0.337 against 0.604/0.425; mask-14 float16 1.94/0.91 against 2.48/1.13;
# big-batch with the argmax 4.21 against 3.96 and 4.03 against 3.31 (the one loss).
CL_BINS = 64
CL_WARPS = 4
CL_VECTOR_BYTES = 16


# The unit kernel: 256 lanes on 8 warps (one lane, so four channels, per thread). Programs hold
# about UNIT_ELEMENTS_CACHED outputs when the input fits in L2 (each lane's geometry amortised
# over many channels) and UNIT_ELEMENTS_STREAMED when it does not (the planes that resident
# programs read together, all ROIs of one channel block, then stay in L2).
UNIT_LANES = 256
UNIT_WARPS = 8
UNIT_ELEMENTS_CACHED = 8192
UNIT_ELEMENTS_STREAMED = 1024
MIN_PROGRAMS_PER_SM = 8


def unit_channels_per_program(
    num_rois: int, channels: int, bins: int, lanes: int, multiprocessors: int, target: int
) -> int:
    """Channels per program of the unit kernel: about `target` outputs, a whole number of the
    program's rounds (4 channels per lane group), halved until the grid has at least
    MIN_PROGRAMS_PER_SM programs per SM (or one round is left)."""
    groups = lanes // min(bins, lanes)
    round_channels = 4 * groups
    per = max(round_channels, target // bins // round_channels * round_channels)
    per = min(per, -(-channels // round_channels) * round_channels)
    while per > round_channels and num_rois * -(-channels // per) < (
        MIN_PROGRAMS_PER_SM * multiprocessors
    ):
        per = max(round_channels, (per // 2) // round_channels * round_channels)
    return per


_device_sizes_cache: dict[int, tuple[int, int]] = {}


def _device_sizes(device: torch.device) -> tuple[int, int]:
    """(SM count, L2 bytes) of a CUDA device, cached; (1, 0) for CPU tensors (interpreter)."""
    if device.type != "cuda":
        return 1, 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    sizes = _device_sizes_cache.get(index)
    if sizes is None:
        properties = torch.cuda.get_device_properties(index)
        sizes = (properties.multi_processor_count, getattr(properties, "L2_cache_size", 0))
        _device_sizes_cache[index] = sizes
    return sizes


def _device_context(tensor: torch.Tensor):
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return _NullContext()


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@functools.lru_cache(maxsize=64)
def _scale_arguments(spatial_scale: float) -> tuple[float, int]:
    """(float32(spatial_scale), the float64's bits as int64): the kernel takes either exactly."""
    as_float32 = float(torch.tensor(spatial_scale, dtype=torch.float32))
    bits = struct.unpack("<q", struct.pack("<d", float(spatial_scale)))[0]
    return as_float32, bits


def roi_pool_forward(
    input: torch.Tensor,
    rois: torch.Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
) -> None:
    """Fill ``output`` (and ``argmax`` unless None) with roi_pool of ``input`` over ``rois``.

    Args:
        input: (N, C, H, W) float16/bfloat16/float32/float64, any strides, H * W < 2^31.
        rois: (K, 5) rows (batch, x1, y1, x2, y2); input's dtype, or float32 for 16-bit input.
        pooled_height, pooled_width: bins per ROI, each >= 1.
        spatial_scale: finite and > 0.
        output: contiguous (K, C, PH, PW) of input's dtype; every element is written.
        argmax: contiguous (K, C, PH, PW) int32, or None to skip the argmax.
    """
    channels = input.shape[1]
    num_rois = rois.shape[0]
    if num_rois == 0 or channels == 0:
        return
    if input.numel() == 0:  # no pixel at all: every bin is empty
        output.zero_()
        if argmax is not None:
            argmax.fill_(-1)
        return
    config = forward_config(input, pooled_height, pooled_width)
    bins = pooled_height * pooled_width
    if config.unit:
        _launch_unit(input, rois, pooled_height, pooled_width, spatial_scale, output, argmax,
                     config)  # fmt: skip
        return
    if config.channels_fast:
        _launch_channels_last(input, rois, pooled_height, pooled_width, spatial_scale, output,
                              argmax, config)  # fmt: skip
        return
    blocks = triton.cdiv(channels * bins, config.block_b)
    s_n, s_c, s_h, s_w = input.stride()
    _launch_in_slices(
        _roi_pool_fwd_kernel,
        input,
        num_rois,
        blocks,
        (*_forward_head(input, rois, pooled_height, pooled_width, output, argmax), s_n, s_c, s_h,
         s_w, rois.stride(0), rois.stride(1), *_scale_arguments(spatial_scale)),
        **_dtype_flags(input, rois),
        W_UNIT=s_w == 1,
        C_UNIT=s_c == 1,
        BLOCK_B=config.block_b,
        SPLIT=config.split,
        TRACK_INDEX=argmax is not None or config.split > 1,
        NEEDS_ARGMAX=argmax is not None,
        num_warps=config.num_warps,
    )  # fmt: skip


def _launch_unit(
    input: torch.Tensor,
    rois: torch.Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
    config: ForwardConfig,
) -> None:
    """`roi_pool_forward` through the unit kernel (unit W stride), sized for the device."""
    channels = input.shape[1]
    num_rois = rois.shape[0]
    bins = pooled_height * pooled_width
    multiprocessors, l2_bytes = _device_sizes(input.device)
    target = config.block_elements
    if target <= 0:
        cached = input.numel() * input.element_size() <= l2_bytes
        target = UNIT_ELEMENTS_CACHED if cached else UNIT_ELEMENTS_STREAMED
    per_program = unit_channels_per_program(
        num_rois, channels, bins, config.block_b, multiprocessors, target
    )
    s_n, s_c, s_h, _ = input.stride()
    _launch_in_slices(
        _roi_pool_fwd_unit_kernel,
        input,
        num_rois,
        triton.cdiv(channels, per_program),
        (*_forward_head(input, rois, pooled_height, pooled_width, output, argmax), s_n, s_c, s_h,
         rois.stride(0), rois.stride(1), *_scale_arguments(spatial_scale)),
        (per_program,),
        **_dtype_flags(input, rois),
        LANES=config.block_b,
        NEEDS_ARGMAX=argmax is not None,
        num_warps=config.num_warps,
    )  # fmt: skip


def _launch_channels_last(
    input: torch.Tensor,
    rois: torch.Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
    config: ForwardConfig,
) -> None:
    """`roi_pool_forward` through the channels_last kernel (unit C stride)."""
    channels = input.shape[1]
    bins = pooled_height * pooled_width
    blocks = triton.cdiv(channels, config.block_c) * triton.cdiv(bins, config.block_b)
    s_n, s_c, s_h, s_w = input.stride()
    _launch_in_slices(
        _roi_pool_fwd_cl_kernel,
        input,
        rois.shape[0],
        blocks,
        (*_forward_head(input, rois, pooled_height, pooled_width, output, argmax), s_n, s_c, s_h,
         s_w, rois.stride(0), rois.stride(1), *_scale_arguments(spatial_scale)),
        **_dtype_flags(input, rois),
        BLOCK_C=config.block_c,
        BLOCK_B=config.block_b,
        VEC=aligned_channel_vector(input, CL_VECTOR_BYTES),
        EVEN_C=channels % config.block_c == 0,
        C_UNIT=s_c == 1,
        NEEDS_ARGMAX=argmax is not None,
        num_warps=config.num_warps,
    )  # fmt: skip


def _forward_head(
    input: torch.Tensor,
    rois: torch.Tensor,
    pooled_height: int,
    pooled_width: int,
    output: torch.Tensor,
    argmax: torch.Tensor | None,
) -> tuple:
    """The arguments both forward kernels start with: tensors (output stands in for a missing
    argmax, which is never written), then N, C, H, W, PH, PW."""
    return (
        input, rois, output, output if argmax is None else argmax, *input.shape, pooled_height,
        pooled_width,
    )  # fmt: skip


def _dtype_flags(input: torch.Tensor, rois: torch.Tensor) -> dict[str, bool]:
    """The forward kernels' dtype constants: half or float64 geometry, float64 reduction."""
    return {
        "GEOM_HALF": rois.dtype == torch.float16,
        "GEOM_F64": rois.dtype == torch.float64,
        "ACC_F64": input.dtype == torch.float64,
    }


def _launch_in_slices(kernel, tensor, num_rois, blocks, before, after=(), **meta) -> None:
    """Launch `kernel` on grid (num_rois, blocks) on `tensor`'s device and torch's current stream,
    in launches of at most MAX_GRID_Y blocks along axis 1; each launch passes its first block
    between the `before` and `after` arguments. Every kernel runs without fp fusion. Repeat
    launches skip Triton's argument binding (`roi_ops_triton.launcher`)."""
    device_index = tensor.device.index if tensor.device.type == "cuda" else -1
    meta["enable_fp_fusion"] = False
    with _device_context(tensor):
        for start in range(0, blocks, MAX_GRID_Y):
            grid = (num_rois, min(MAX_GRID_Y, blocks - start))
            launcher.launch(kernel, grid, (*before, start, *after), meta, device_index)


# Outputs per backward program. When the float32/float64 grad_input exceeds L2, small blocks keep
# the planes that resident programs add into (all ROIs of one block of channels run first) in
# L2; otherwise larger blocks. Measured on the H100 (scripts/backward_probe.py, float32):
# fpn-p2 1.03 -> 0.91 ms and big-batch 2.38 -> 2.25 ms with 512 instead of 1024; mask-14
# 1.67 -> 1.59 ms with 2048; frcnn-c4 and fpn-p4 the same with either.
BACKWARD_BLOCK = 2048
BACKWARD_BLOCK_STREAMED = 512


def backward_block(grad_input_bytes: int, l2_bytes: int) -> int:
    """Outputs per program of the backward kernel for a grad_input of this many bytes."""
    return BACKWARD_BLOCK if grad_input_bytes <= l2_bytes else BACKWARD_BLOCK_STREAMED


# A channels_last input's gradient: the scatter writes it channels_last itself only when the
# input has at least as many elements as grad_output. Its atomics then land a channel stride
# apart instead of next to each other, a cost per grad_output element; the copy it saves costs
# per input element (H100, channels_last queued bench, fwd+bwd float32: fpn-p2, 2.2 input
# elements per output element, 1.98 ms against 2.45 with the copy; mask-14, 0.03, 4.58 against
# 3.62; big-batch, 0.28, 7.37 against 6.89).
GRADIENT_LAYOUT_ENV = "ROI_OPS_TRITON_GRADIENT_LAYOUT"


def channels_last_gradient(input_elements: int, grad_output_elements: int) -> bool:
    """Whether the backward writes a channels_last input's gradient channels_last (else
    contiguous, which roi_ops copies). ``ROI_OPS_TRITON_GRADIENT_LAYOUT=channels_last|contiguous``
    forces one, for tuning and tests."""
    forced = os.environ.get(GRADIENT_LAYOUT_ENV, "").strip()
    if forced in ("channels_last", "contiguous"):
        return forced == "channels_last"
    return input_elements >= grad_output_elements


def roi_pool_backward(
    grad_output: torch.Tensor,
    argmax: torch.Tensor,
    batch_index: torch.Tensor,
    input_shape: tuple[int, int, int, int],
    input_dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """grad_input by scattering ``grad_output`` at ``argmax`` with atomic adds (not deterministic).

    Args:
        grad_output: (K, C, PH, PW), any strides (zero strides included).
        argmax: contiguous (K, C, PH, PW) int32; -1 entries get no gradient.
        batch_index: (K,) int64, each in [0, N).
        input_shape: (N, C, H, W).
        input_dtype: dtype of the result; float16/bfloat16 accumulate in float32, rounded once.
        memory_format: torch.contiguous_format or torch.channels_last (see
            `channels_last_gradient`: contiguous may come back instead).

    Returns:
        (N, C, H, W) gradient of ``input_dtype``, dense in `memory_format` or contiguous.
    """
    num_images, channels, height, width = input_shape
    num_rois, _, pooled_height, pooled_width = argmax.shape
    accumulate = torch.float64 if input_dtype == torch.float64 else torch.float32
    if memory_format == torch.channels_last:
        input_elements = num_images * channels * height * width
        if not channels_last_gradient(input_elements, argmax.numel()):
            memory_format = torch.contiguous_format
    grad_input = torch.empty(
        input_shape, dtype=accumulate, device=grad_output.device, memory_format=memory_format
    ).zero_()
    if num_rois > 0 and grad_input.numel() > 0 and argmax.numel() > 0:
        l2_bytes = _device_sizes(grad_input.device)[1]
        block = backward_block(grad_input.numel() * grad_input.element_size(), l2_bytes)
        blocks = triton.cdiv(channels * pooled_height * pooled_width, block)
        batch_index = batch_index.to(device=grad_output.device, dtype=torch.int64).contiguous()
        _launch_in_slices(
            _roi_pool_bwd_kernel,
            grad_output,
            num_rois,
            blocks,
            (grad_output, argmax, batch_index, grad_input, channels, height * width,
             pooled_height, pooled_width, *grad_output.stride()),
            ACC_F64=accumulate == torch.float64,
            BLOCK=block,
            CHANNELS_LAST=memory_format == torch.channels_last,
            num_warps=4,
        )  # fmt: skip
    return grad_input if grad_input.dtype == input_dtype else grad_input.to(input_dtype)
