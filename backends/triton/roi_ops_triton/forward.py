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


@triton.jit
def _channel_plane(image, chan, c0, c_end, s_c, corner):
    # Each lane's bin corner in channel `chan`; channels past the program's end read channel c0.
    return image + (tl.where(chan < c_end, chan, c0) * s_c + corner)


@triton.jit
def _channel_step(pointer, best, at, cand, F64: tl.constexpr, TRACK: tl.constexpr):
    # One element of every lane's bin in one channel.
    return first_max_update(comparable(tl.load(pointer), F64), best, at, cand, F64, TRACK)


@triton.jit
def unit_pool(
    image, out_ptr, arg_ptr, k, blk, valid, x1, y1, bin_h, bin_w,
    C, H, W, PH, PW, s_c, s_h, chan_per_prog,
    GEOM_HALF: tl.constexpr, GEOM_F64: tl.constexpr, ACC_F64: tl.constexpr,
    LANES: tl.constexpr, CHANNELS: tl.constexpr, NEEDS_ARGMAX: tl.constexpr,
):  # fmt: skip
    """The unit kernel's work for ROI k, block blk (see `roi_pool_forward_unit`), given the
    ROI's geometry (`device.program_roi`) and `image`, the ROI's image in the input (any image
    in bounds for an invalid ROI)."""
    phpw = PH * PW
    span = tl.minimum(phpw, LANES)
    groups = LANES // span
    lanes = tl.arange(0, LANES)
    lane_group = lanes // span
    lane_bin = lanes - lane_group * span
    c_start = blk.to(tl.int64) * chan_per_prog
    c_end = tl.minimum(c_start + chan_per_prog, C)
    out_roi = k.to(tl.int64) * C * phpw
    for b0 in range(0, phpw, span):
        bins = b0 + lane_bin
        lane_ok = (lane_group < groups) & (bins < phpw)
        filled, hs, ws, last_row, last_col = clamped_bins(
            bins, lane_ok, valid, x1, y1, bin_h, bin_w, H, W, PW, GEOM_HALF, GEOM_F64
        )
        max_bh = tl.max(last_row, 0) + 1
        max_bw = tl.max(last_col, 0) + 1
        corner = hs.to(tl.int64) * s_h + ws
        first_index = hs * W + ws
        for c0 in range(c_start, c_end, CHANNELS * groups):
            ch0 = c0 + lane_group
            ch1 = ch0 + groups
            ch2 = ch1 + groups
            ch3 = ch2 + groups
            # Channels 1 to 3 exist only when CHANNELS says so; these names are otherwise unused.
            p0 = _channel_plane(image, ch0, c0, c_end, s_c, corner)
            p1, p2, p3 = p0, p0, p0
            if CHANNELS >= 2:
                p1 = _channel_plane(image, ch1, c0, c_end, s_c, corner)
            if CHANNELS >= 4:
                p2 = _channel_plane(image, ch2, c0, c_end, s_c, corner)
                p3 = _channel_plane(image, ch3, c0, c_end, s_c, corner)
            best0 = comparable(tl.load(p0), ACC_F64)
            best1, best2, best3 = best0, best0, best0
            if CHANNELS >= 2:
                best1 = comparable(tl.load(p1), ACC_F64)
            if CHANNELS >= 4:
                best2 = comparable(tl.load(p2), ACC_F64)
                best3 = comparable(tl.load(p3), ACC_F64)
            at0 = tl.zeros([LANES], tl.int32)
            at1, at2, at3 = at0, at0, at0
            row = tl.zeros([LANES], tl.int32)  # (row - hs) * W of the current row
            for i in range(0, max_bh):
                for j in range(0, max_bw):
                    jj = tl.minimum(last_col, j)
                    cand = row + jj
                    best0, at0 = _channel_step(p0 + jj, best0, at0, cand, ACC_F64, NEEDS_ARGMAX)
                    if CHANNELS >= 2:
                        best1, at1 = _channel_step(p1 + jj, best1, at1, cand, ACC_F64,
                                                   NEEDS_ARGMAX)  # fmt: skip
                    if CHANNELS >= 4:
                        best2, at2 = _channel_step(p2 + jj, best2, at2, cand, ACC_F64,
                                                   NEEDS_ARGMAX)  # fmt: skip
                        best3, at3 = _channel_step(p3 + jj, best3, at3, cand, ACC_F64,
                                                   NEEDS_ARGMAX)  # fmt: skip
                # Rows past a lane's last stay on its last row (clamped, as columns are).
                advance = i < last_row
                p0 += tl.where(advance, s_h, 0)
                if CHANNELS >= 2:
                    p1 += tl.where(advance, s_h, 0)
                if CHANNELS >= 4:
                    p2 += tl.where(advance, s_h, 0)
                    p3 += tl.where(advance, s_h, 0)
                row += tl.where(advance, W, 0)
            base = out_roi + c0 * phpw + lane_group * phpw + bins
            step = groups * phpw
            store_bins(out_ptr, arg_ptr, base, lane_ok & (ch0 < c_end), filled, best0, at0,
                       first_index, NEEDS_ARGMAX)  # fmt: skip
            if CHANNELS >= 2:
                store_bins(out_ptr, arg_ptr, base + step, lane_ok & (ch1 < c_end), filled, best1,
                           at1, first_index, NEEDS_ARGMAX)  # fmt: skip
            if CHANNELS >= 4:
                store_bins(out_ptr, arg_ptr, base + 2 * step, lane_ok & (ch2 < c_end), filled,
                           best2, at2, first_index, NEEDS_ARGMAX)  # fmt: skip
                store_bins(out_ptr, arg_ptr, base + 3 * step, lane_ok & (ch3 < c_end), filled,
                           best3, at3, first_index, NEEDS_ARGMAX)  # fmt: skip


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
    reduces CHANNELS (1, 2 or 4) channels of it at once, sharing addresses, loop bounds and the
    argmax offset between them.

    Program (k, blk) covers channels [blk * chan_per_prog, ...) of ROI k. Lanes form `groups`
    groups of `span` bins; lane (g, b) takes channels c0 + u * groups + g (u < CHANNELS) of bin
    b, so for each u the lanes' outputs are contiguous. Channels past the program's end are read
    from channel c0 and never stored.

    Every value is a [LANES] vector, one per channel (written out, not a [CHANNELS, LANES]
    tile): Triton then gives each thread one lane and all its channels whatever its version
    (the coalescing pass of some versions lays a tile out channels-fastest, recomputing each
    lane's geometry per channel and splitting warps over channels).
    """
    k, blk, valid, batch, x1, y1, bin_h, bin_w = program_roi(
        rois_ptr, s_rk, s_rj, N, PH, PW, scale_f32, scale_bits, blk_offset, log_ptr,
        GEOM_HALF, GEOM_F64, REPORT_BAD,
    )  # fmt: skip
    unit_pool(
        inp_ptr + tl.where(valid, batch, 0) * s_n, out_ptr, arg_ptr, k, blk, valid, x1, y1,
        bin_h, bin_w, C, H, W, PH, PW, s_c, s_h, chan_per_prog,
        GEOM_HALF, GEOM_F64, ACC_F64, LANES, CHANNELS, NEEDS_ARGMAX,
    )  # fmt: skip


@triton.jit
def channels_last_pool(
    inp_ptr, out_ptr, arg_ptr, k, blk, valid, batch, x1, y1, bin_h, bin_w,
    C, H, W, PH, PW, s_n, s_c, s_h, s_w,
    GEOM_HALF: tl.constexpr, GEOM_F64: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, VEC: tl.constexpr, EVEN_C: tl.constexpr,
    C_UNIT: tl.constexpr, NEEDS_ARGMAX: tl.constexpr,
):  # fmt: skip
    """The channels_last kernel's work for ROI k, block blk (see
    `roi_pool_forward_channels_last`), given the ROI's geometry (`device.program_roi`)."""
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
    channels_last_pool(
        inp_ptr, out_ptr, arg_ptr, k, blk, valid, batch, x1, y1, bin_h, bin_w,
        C, H, W, PH, PW, s_n, s_c, s_h, s_w,
        GEOM_HALF, GEOM_F64, ACC_F64, BLOCK_C, BLOCK_B, VEC, EVEN_C, C_UNIT, NEEDS_ARGMAX,
    )  # fmt: skip


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
