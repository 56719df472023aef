"""The forward kernels: roi_pool of one (ROI, block) per program, chosen per call by the input's
strides (`roi_ops_triton.plan`), and the bad-ROI recorder for calls with nothing to pool.

Every kernel runs one program per (ROI, block), grid (K, blocks): ROIs are on axis 0, so the
programs resident at any time read the same channels of the same images (L2 reuse); axis 1 is
the block of that ROI's outputs. Each output's bin is scanned rows outer, columns inner, keeping
the first maximum (`device.first_max_update`). A program's bins all come from one ROI, so they
differ in size by at most a row or column (or are cut by the map border); loops run to the
largest bin of the program with each lane clamped into its own bin (`device.clamped_bins`).

The kernels share their leading arguments:

    inp_ptr, rois_ptr, out_ptr, arg_ptr, log_ptr, N, C, H, W, PH, PW, s_n, s_c, s_h, s_w,
    s_rk, s_rj, scale_f32, scale_bits, blk_offset

(``arg_ptr`` and ``log_ptr`` are never touched without NEEDS_ARGMAX and REPORT_BAD; program
(k, b) works on block ``b + blk_offset``), then the dtype constants GEOM_HALF, GEOM_F64 and
ACC_F64. Only dtypes, block sizes, layout flags and the argmax and report flags are compile-time
constants. Shapes and strides are runtime arguments marked ``do_not_specialize``, so new K, N,
C, H or W do not recompile (a value passing 2^31 still selects a 64-bit variant).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .device import (
    clamped_bins,
    comparable,
    first_max_update,
    load_roi,
    program_roi,
    record_bad_roi,
    roi_validity,
    scan_bins,
    store_bins,
)

# The runtime arguments that Triton must not specialise (new shapes would recompile otherwise).
RUNTIME = ["N", "C", "H", "W", "PH", "PW", "s_n", "s_c", "s_h", "s_w", "scale_bits", "blk_offset"]


@triton.jit(do_not_specialize=[*RUNTIME, "chan_per_prog"])
def roi_pool_forward_unit(
    inp_ptr, rois_ptr, out_ptr, arg_ptr, log_ptr,
    N, C, H, W, PH, PW, s_n, s_c, s_h, s_w, s_rk, s_rj, scale_f32, scale_bits, blk_offset,
    chan_per_prog,
    GEOM_HALF: tl.constexpr, GEOM_F64: tl.constexpr, ACC_F64: tl.constexpr,
    LANES: tl.constexpr, CHANNELS: tl.constexpr,
    NEEDS_ARGMAX: tl.constexpr, REPORT_BAD: tl.constexpr,
):  # fmt: skip
    """Unit W stride (`s_w` is 1 and unused): each lane owns one bin (its edges in registers) and
    reduces CHANNELS channels of it at once, sharing addresses, loop bounds and the argmax
    offset between them.

    Program (k, blk) covers channels [blk * chan_per_prog, ...) of ROI k. Lanes form `groups`
    groups of `span` bins; lane (g, b) takes channels c0 + u * groups + g (u < CHANNELS) of bin
    b, so for each u the lanes' outputs are contiguous. Channels past the program's end are read
    from channel c0 and never stored.
    """
    k, blk, valid, batch, x1, y1, bin_h, bin_w = program_roi(
        rois_ptr, s_rk, s_rj, N, PH, PW, scale_f32, scale_bits, blk_offset, log_ptr,
        GEOM_HALF, GEOM_F64, REPORT_BAD,
    )  # fmt: skip
    phpw = PH * PW
    span = tl.minimum(phpw, LANES)
    groups = LANES // span
    lanes = tl.arange(0, LANES)
    lane_group = lanes // span
    lane_bin = lanes - lane_group * span
    unit = tl.arange(0, CHANNELS)[:, None]
    c_start = blk.to(tl.int64) * chan_per_prog
    c_end = tl.minimum(c_start + chan_per_prog, C)
    image = inp_ptr + tl.where(valid, batch, 0) * s_n
    out_roi = k.to(tl.int64) * C * phpw
    for b0 in range(0, phpw, span):
        bins = b0 + lane_bin
        lane_ok = (lane_group < groups) & (bins < phpw)
        filled, hs, ws, last_row, last_col = clamped_bins(
            bins, lane_ok, valid, x1, y1, bin_h, bin_w, H, W, PW, GEOM_HALF, GEOM_F64
        )
        max_bh = tl.max(last_row, 0) + 1
        max_bw = tl.max(last_col, 0) + 1
        corner = (hs.to(tl.int64) * s_h + ws)[None, :]
        first_index = (hs * W + ws)[None, :]
        for c0 in range(c_start, c_end, CHANNELS * groups):
            chan = c0 + lane_group[None, :] + unit * groups  # [CHANNELS, LANES]
            chan_ok = chan < c_end
            plane = image + tl.where(chan_ok, chan, c0) * s_c
            best = comparable(tl.load(plane + corner), ACC_F64)
            at = tl.zeros([CHANNELS, LANES], tl.int32)
            for i in range(0, max_bh):
                ii = tl.minimum(last_row, i)
                pointer = plane + (corner + (ii.to(tl.int64) * s_h)[None, :])
                for j in range(0, max_bw):
                    jj = tl.minimum(last_col, j)
                    cand = tl.broadcast_to((ii * W + jj)[None, :], [CHANNELS, LANES])
                    x = comparable(tl.load(pointer + jj[None, :]), ACC_F64)
                    best, at = first_max_update(x, best, at, cand, ACC_F64, NEEDS_ARGMAX)
            offsets = out_roi + chan * phpw + bins[None, :]
            store_bins(out_ptr, arg_ptr, offsets, lane_ok[None, :] & chan_ok, filled[None, :],
                       best, at, first_index, NEEDS_ARGMAX)  # fmt: skip


@triton.jit(do_not_specialize=RUNTIME)
def roi_pool_forward_channels_last(
    inp_ptr, rois_ptr, out_ptr, arg_ptr, log_ptr,
    N, C, H, W, PH, PW, s_n, s_c, s_h, s_w, s_rk, s_rj, scale_f32, scale_bits, blk_offset,
    GEOM_HALF: tl.constexpr, GEOM_F64: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, VEC: tl.constexpr, EVEN_C: tl.constexpr,
    C_UNIT: tl.constexpr,
    NEEDS_ARGMAX: tl.constexpr, REPORT_BAD: tl.constexpr,
):  # fmt: skip
    """Unit C stride (channels_last; C_UNIT, though any C stride runs): a [BLOCK_B bins,
    BLOCK_C channels] tile; each element of a bin is read for BLOCK_C adjacent channels at once,
    as VEC-element vectors when the host has checked that every bin's first channel is
    VEC-element aligned (VEC > 1).

    Program (k, blk) covers one block of bins and one block of channels of ROI k. Channels past
    C read channel C - 1 unless C is a multiple of BLOCK_C (EVEN_C), and are never stored.
    Triton converts the tile's layout for the bin-contiguous stores.
    """
    k, blk, valid, batch, x1, y1, bin_h, bin_w = program_roi(
        rois_ptr, s_rk, s_rj, N, PH, PW, scale_f32, scale_bits, blk_offset, log_ptr,
        GEOM_HALF, GEOM_F64, REPORT_BAD,
    )  # fmt: skip
    phpw = PH * PW
    bin_blocks = tl.cdiv(phpw, BLOCK_B)
    bins = (blk % bin_blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
    chan = (blk // bin_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    bin_ok = bins < phpw
    filled, hs, ws, last_row, last_col = clamped_bins(
        bins, bin_ok, valid, x1, y1, bin_h, bin_w, H, W, PW, GEOM_HALF, GEOM_F64
    )
    if EVEN_C:
        chan_read = chan[None, :]
    else:
        chan_read = tl.minimum(chan, C - 1)[None, :]
    if not C_UNIT:
        chan_read = chan_read * s_c
    first = tl.where(valid, batch, 0) * s_n + hs.to(tl.int64) * s_h + ws.to(tl.int64) * s_w
    if VEC > 1:
        first = tl.multiple_of(first, VEC)
    best, at = scan_bins(
        inp_ptr, first, chan_read, last_row, last_col, s_h, s_w, W, ACC_F64, NEEDS_ARGMAX, VEC
    )
    offsets = k.to(tl.int64) * C * phpw + chan[None, :] * phpw + bins[:, None]
    ok = bin_ok[:, None] & (chan < C)[None, :]
    store_bins(out_ptr, arg_ptr, offsets, ok, filled[:, None], best, at, (hs * W + ws)[:, None],
               NEEDS_ARGMAX)  # fmt: skip


@triton.jit(do_not_specialize=RUNTIME)
def roi_pool_forward_flat(
    inp_ptr, rois_ptr, out_ptr, arg_ptr, log_ptr,
    N, C, H, W, PH, PW, s_n, s_c, s_h, s_w, s_rk, s_rj, scale_f32, scale_bits, blk_offset,
    GEOM_HALF: tl.constexpr, GEOM_F64: tl.constexpr, ACC_F64: tl.constexpr,
    LANES: tl.constexpr,
    NEEDS_ARGMAX: tl.constexpr, REPORT_BAD: tl.constexpr,
):  # fmt: skip
    """Any strides: lane l of program (k, blk) owns output element blk * LANES + l of ROI k's
    contiguous (C, PH, PW) block, a (channel, bin), so stores are fully coalesced."""
    k, blk, valid, batch, x1, y1, bin_h, bin_w = program_roi(
        rois_ptr, s_rk, s_rj, N, PH, PW, scale_f32, scale_bits, blk_offset, log_ptr,
        GEOM_HALF, GEOM_F64, REPORT_BAD,
    )  # fmt: skip
    phpw = PH * PW
    first_output = blk.to(tl.int64) * LANES
    c0 = first_output // phpw
    local = (first_output - c0 * phpw).to(tl.int32) + tl.arange(0, LANES)
    bins = local % phpw
    chan = c0 + local // phpw
    lane_ok = chan < C
    filled, hs, ws, last_row, last_col = clamped_bins(
        bins, lane_ok, valid, x1, y1, bin_h, bin_w, H, W, PW, GEOM_HALF, GEOM_F64
    )
    plane = (tl.where(lane_ok, chan, 0) * s_c)[:, None]
    first = tl.where(valid, batch, 0) * s_n + hs.to(tl.int64) * s_h + ws.to(tl.int64) * s_w
    best, at = scan_bins(
        inp_ptr, first, plane, last_row, last_col, s_h, s_w, W, ACC_F64, NEEDS_ARGMAX, 1
    )
    offsets = (k.to(tl.int64) * C * phpw + chan * phpw + bins)[:, None]
    store_bins(out_ptr, arg_ptr, offsets, lane_ok[:, None], filled[:, None], best, at,
               (hs * W + ws)[:, None], NEEDS_ARGMAX)  # fmt: skip


@triton.jit(do_not_specialize=["N"])
def record_bad_rois(rois_ptr, log_ptr, N, s_rk, s_rj, GEOM_F64: tl.constexpr):
    """Record ROI row program_id(0) in the bad-ROI log if it is invalid: for calls whose input
    has no pixel or no channel, where no forward kernel runs."""
    k = tl.program_id(0)
    r0, r1, r2, r3, r4 = load_roi(rois_ptr, k, s_rk, s_rj, GEOM_F64)
    valid, _ = roi_validity(r0, r1, r2, r3, r4, N, GEOM_F64)
    record_bad_roi(log_ptr, k, r0, r1, r2, r3, r4, N, ~valid)
