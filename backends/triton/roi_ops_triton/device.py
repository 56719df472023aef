"""Device helpers that the forward and backward kernels share: the contract's geometry, the
first-maximum reduction, stores and the bad-ROI log.

Importing this module imports Triton. Whether kernels run compiled or under Triton's CPU
interpreter is fixed here, at first import, by ``TRITON_INTERPRET`` (`interpreting`).

Exactness (docs/contract.md), as the helpers implement it:

* Geometry is computed in the kernel per ROI and per bin. float16 geometry is carried in float32
  and rounded to half after every operation; float32 division is ``tl.math.div_rn`` (Triton's
  ``/`` is approximate on GPUs); float64 is native. Kernels launch with
  ``enable_fp_fusion=False`` so that no multiply is fused into an add.
* NaN and finiteness tests look at the bits: Triton's code generator may assume there are no
  NaNs and fold ``x != x``.
* Compiled kernels compare with inline PTX (``setp.gtu`` then ``setp.num.and``: no flush of
  subnormals, NaN handled by the predicate; float16 natively, so a float16 result keeps the bits
  it was loaded with, NaN payloads included). The interpreter, which cannot run PTX, tests bits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .interpreter import interpreting

INTERPRETED = tl.constexpr(interpreting())
INDEX_LIMIT = tl.constexpr(1099511627776.0)  # 2**40: the contract's index() saturation bound
LOG_KEYS = tl.constexpr(11)  # the bad-ROI log's slots that keys go to (roi_ops.bad_rois)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@triton.jit
def is_nan(x, F64: tl.constexpr):
    """NaN test on the bits (float16, float32, or float64 when F64)."""
    if x.dtype == tl.float16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF) > 0x7C00
    elif F64:
        bits = x.to(tl.int64, bitcast=True)
        return (bits & 0x7FFFFFFFFFFFFFFF) > 0x7FF0000000000000
    else:
        bits = x.to(tl.int32, bitcast=True)
        return (bits & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def is_finite(x, F64: tl.constexpr):
    """Finiteness test on the bits (float32, or float64 when F64)."""
    if F64:
        bits = x.to(tl.int64, bitcast=True)
        return (bits & 0x7FF0000000000000) != 0x7FF0000000000000
    else:
        bits = x.to(tl.int32, bitcast=True)
        return (bits & 0x7F800000) != 0x7F800000


@triton.jit
def widen(x, F64: tl.constexpr):
    """Exact conversion of a loaded value to float64 (F64) or float32. bfloat16 goes through its
    bits (what the hardware conversion does), which also sidesteps the interpreter's conversion
    that flushes bfloat16 subnormals."""
    if F64:
        return x.to(tl.float64)
    elif x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def comparable(x, F64: tl.constexpr):
    """A loaded feature value in the type the reduction compares. Compiled kernels keep float16
    as it is (PTX compares it natively, so the winner is stored with the bits it was loaded
    with: a float32 round trip would turn every NaN into the canonical one); otherwise the
    exact `widen`."""
    if INTERPRETED:
        return widen(x, F64)
    elif x.dtype == tl.float16:
        return x
    else:
        return widen(x, F64)


@triton.jit
def narrow(x, dtype: tl.constexpr):
    """Back to the storage dtype; exact because every value came from that dtype (or is 0)."""
    if dtype == tl.bfloat16:
        return (x.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


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
def index(v, F64: tl.constexpr):
    """The contract's index(v): NaN -> 0, saturate to [-2^40, 2^40], then a 64-bit integer."""
    v = tl.where(is_nan(v, F64), 0.0, v)
    v = tl.where(v > INDEX_LIMIT, INDEX_LIMIT, v)
    v = tl.where(v < -INDEX_LIMIT, -INDEX_LIMIT, v)
    return v.to(tl.int64)


@triton.jit
def _corner(coord, scale, HALF: tl.constexpr, F64: tl.constexpr):
    return index(_c_round(_to_geom(coord * scale, HALF)), F64)


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
def load_roi(rois_ptr, k, s_rk, s_rj, F64: tl.constexpr):
    """The five values of ROI row k, widened exactly to the geometry type (float64 or float32)."""
    row = rois_ptr + k.to(tl.int64) * s_rk
    r0 = widen(tl.load(row), F64)
    r1 = widen(tl.load(row + s_rj), F64)
    r2 = widen(tl.load(row + 2 * s_rj), F64)
    r3 = widen(tl.load(row + 3 * s_rj), F64)
    r4 = widen(tl.load(row + 4 * s_rj), F64)
    return r0, r1, r2, r3, r4


@triton.jit
def roi_batch(r0, F64: tl.constexpr):
    """trunc(r0) as the contract's int64 index (NaN -> 0, saturated)."""
    return index(tl.where(r0 >= 0.0, tl.math.floor(r0), tl.math.ceil(r0)), F64)


@triton.jit
def roi_image(rois_ptr, k, s_rk, N, F64: tl.constexpr):
    """The image ROI k pools from, trunc(rois[k, 0]), clamped into [0, N) (an invalid ROI reads
    and writes nothing, so any image in bounds will do)."""
    batch = roi_batch(widen(tl.load(rois_ptr + k.to(tl.int64) * s_rk), F64), F64)
    return tl.minimum(tl.maximum(batch, 0), N - 1)


@triton.jit
def roi_validity(r0, r1, r2, r3, r4, N, F64: tl.constexpr):
    """(valid, batch): a ROI is valid when its five values are finite and its batch index
    trunc(r0) is in [0, N)."""
    finite = is_finite(r0, F64) & is_finite(r1, F64) & is_finite(r2, F64)
    finite = finite & is_finite(r3, F64) & is_finite(r4, F64)
    batch = roi_batch(r0, F64)
    return finite & (batch >= 0) & (batch < N), batch


@triton.jit
def record_bad_roi(log_ptr, k, r0, r1, r2, r3, r4, N, bad):
    """When `bad`, record ROI row k in the bad-ROI log exactly as roi_ops.bad_rois specifies:
    slot 2j (2j + 1) gets the atomic minimum of (k << 32) | the low (high) 32 bits of float64
    value j, slot 10 of (k << 32) | N. Keys of an earlier row are smaller, so the log ends up
    holding the first bad row whatever order programs run in."""
    if bad:
        slot = tl.arange(0, 16)
        column = slot // 2
        value = tl.where(column == 0, r0, tl.where(column == 1, r1, tl.where(column == 2, r2, r3)))
        value = tl.where(column >= 4, r4, value)
        bits = value.to(tl.float64).to(tl.int64, bitcast=True)  # exact from float32 and float64
        piece = tl.where(slot % 2 == 0, bits, bits >> 32) & 0xFFFFFFFF
        piece = tl.where(slot == 10, N.to(tl.int64), piece)
        key = (k.to(tl.int64) << 32) | piece
        # System scope: the log may be pinned host memory that the host reads without waiting.
        tl.atomic_min(log_ptr + slot, key, mask=slot < LOG_KEYS, sem="relaxed", scope="sys")


@triton.jit
def program_roi(
    rois_ptr, s_rk, s_rj, N, PH, PW, scale_f32, scale_bits, blk_offset, log_ptr,
    HALF: tl.constexpr, F64: tl.constexpr, REPORT_BAD: tl.constexpr,
):  # fmt: skip
    """A forward program's ROI k (grid axis 0), block (axis 1, from `blk_offset`) and the ROI's
    geometry: (k, blk, valid, batch, x1, y1, bin_h, bin_w); batch, x1 and y1 are int64. With
    REPORT_BAD, the program of block 0 records an invalid ROI (batch outside [0, N), a
    non-finite value) in the bad-ROI log at `log_ptr`."""
    k = tl.program_id(0)
    blk = tl.program_id(1) + blk_offset
    r0, r1, r2, r3, r4 = load_roi(rois_ptr, k, s_rk, s_rj, F64)
    if F64:
        scale = tl.cast(tl.cast(scale_bits, tl.int64), tl.float64, bitcast=True)
    else:
        scale = _to_geom(tl.cast(scale_f32, tl.float32), HALF)
    valid, batch = roi_validity(r0, r1, r2, r3, r4, N, F64)
    if REPORT_BAD:
        record_bad_roi(log_ptr, k, r0, r1, r2, r3, r4, N, (blk == 0) & ~valid)
    x1 = _corner(r1, scale, HALF, F64)
    y1 = _corner(r2, scale, HALF, F64)
    x2 = _corner(r3, scale, HALF, F64)
    y2 = _corner(r4, scale, HALF, F64)
    bin_w = _bin_size(tl.maximum(x2 - x1 + 1, 1), PW, HALF, F64)
    bin_h = _bin_size(tl.maximum(y2 - y1 + 1, 1), PH, HALF, F64)
    return k, blk, valid, batch, x1, y1, bin_h, bin_w


@triton.jit
def _bin_edges(p, bin_size, corner, limit, HALF: tl.constexpr, F64: tl.constexpr):
    # [start, end) along one axis for bin indices p (int32 tensor), clamped to [0, limit].
    if F64:
        lo = p.to(tl.float64)
        hi = (p + 1).to(tl.float64)
    else:
        lo = _to_geom(p.to(tl.float32), HALF)
        hi = _to_geom((p + 1).to(tl.float32), HALF)
    start = index(tl.math.floor(_to_geom(lo * bin_size, HALF)), F64) + corner
    end = index(tl.math.ceil(_to_geom(hi * bin_size, HALF)), F64) + corner
    start = tl.minimum(tl.maximum(start, 0), limit)
    end = tl.minimum(tl.maximum(end, 0), limit)
    return start.to(tl.int32), end.to(tl.int32)


@triton.jit
def clamped_bins(
    bins,
    ok,
    valid,
    x1,
    y1,
    bin_h,
    bin_w,
    H,
    W,
    PW,
    HALF: tl.constexpr,
    F64: tl.constexpr,
):
    """Each lane's bin (int32 index `bins`) for scans clamped into it: (filled, first row, first
    column, last row offset, last column offset). Empty bins, invalid ROIs and lanes that are
    not `ok` become element 0 of the plane, 1 x 1 (in bounds), and store nothing they read
    (filled is False).

    Scans run to the largest bin of the program with each lane's row and column clamped into
    its own bin: a re-read element equals one seen before and never replaces it, so no load is
    masked."""
    ph = bins // PW
    pw = bins - ph * PW
    hs, he = _bin_edges(ph, bin_h, y1, H, HALF, F64)
    ws, we = _bin_edges(pw, bin_w, x1, W, HALF, F64)
    filled = valid & (he > hs) & (we > ws) & ok
    last_row = tl.where(filled, he - hs, 1) - 1
    last_col = tl.where(filled, we - ws, 1) - 1
    return filled, tl.where(filled, hs, 0), tl.where(filled, ws, 0), last_row, last_col


# --------------------------------------------------------------------------------------------
# The first maximum
# --------------------------------------------------------------------------------------------


@triton.jit
def _ptx_first_max(
    x,
    best,
    at,
    cand,
    TYPE: tl.constexpr,
    BITS: tl.constexpr,
    REG: tl.constexpr,
    TRACK: tl.constexpr,
):
    # p: x > best or unordered (setp.gtu), and best is a number (setp.num.and): x replaces best.
    if TRACK:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gtu." + TYPE + " p, $2, $3; setp.num.and." + TYPE
            + " p, $3, $3, p; selp." + BITS + " $0, $2, $3, p; selp.b32 $1, $5, $4, p; }",
            "=" + REG + ",=r," + REG + "," + REG + ",r,r",
            [x, best, at, cand],
            dtype=(x.dtype, tl.int32),
            is_pure=True,
            pack=1,
        )  # fmt: skip
    else:
        best = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gtu." + TYPE + " p, $1, $2; setp.num.and." + TYPE
            + " p, $2, $2, p; selp." + BITS + " $0, $1, $2, p; }",
            "=" + REG + "," + REG + "," + REG,
            [x, best],
            dtype=x.dtype,
            is_pure=True,
            pack=1,
        )  # fmt: skip
        return best, at


@triton.jit
def first_max_update(x, best, at, cand, F64: tl.constexpr, TRACK: tl.constexpr):
    """(best, at) after element x at bin offset cand (all of one shape): x replaces best when it
    is greater, or NaN while best is not; the contract's first maximum for a scan in increasing
    offset order. `at` is only updated with TRACK."""
    if INTERPRETED:
        take = ~is_nan(best, F64) & (is_nan(x, F64) | (x > best))
        if TRACK:
            at = tl.where(take, cand, at)
        return tl.where(take, x, best), at
    elif x.dtype == tl.float16:
        return _ptx_first_max(x, best, at, cand, "f16", "b16", "h", TRACK)
    elif F64:
        return _ptx_first_max(x, best, at, cand, "f64", "f64", "d", TRACK)
    else:
        return _ptx_first_max(x, best, at, cand, "f32", "f32", "f", TRACK)


@triton.jit
def scan_bins(
    inp_ptr,
    first,
    lane_offsets,
    last_row,
    last_col,
    s_h,
    s_w,
    W,
    F64: tl.constexpr,
    TRACK: tl.constexpr,
    VEC: tl.constexpr,
):
    """First maxima of a [B, X] tile: element (b, x) scans the bin whose first element is at
    ``first[b] + lane_offsets[., x]`` (int64 element offsets from `inp_ptr`), clamped into its
    `last_row` x `last_col` extent (see `clamped_bins`), rows outer. Returns (best, at), `at`
    the winner's offset ``row * W + column`` from the bin's first element. With VEC > 1 every
    ``first`` offset is a multiple of VEC (the caller marks it with ``tl.multiple_of``: a hint
    on an argument does not reach the caller's value), and the loads of VEC adjacent lanes are
    vectors. Offsets are recomputed at every element (no loop-carried pointer), so the
    alignment hint holds for every load."""
    max_bh = tl.max(last_row, 0) + 1
    max_bw = tl.max(last_col, 0) + 1
    best = comparable(tl.load(inp_ptr + first[:, None] + lane_offsets), F64)
    at = tl.zeros(best.shape, tl.int32)
    for i in range(0, max_bh):
        ii = tl.minimum(last_row, i)
        for j in range(0, max_bw):
            jj = tl.minimum(last_col, j)
            offset = first + ii.to(tl.int64) * s_h + jj.to(tl.int64) * s_w
            if VEC > 1:
                offset = tl.multiple_of(offset, VEC)
            x = comparable(tl.load(inp_ptr + offset[:, None] + lane_offsets), F64)
            cand = tl.broadcast_to((ii * W + jj)[:, None], best.shape)
            best, at = first_max_update(x, best, at, cand, F64, TRACK)
    return best, at


@triton.jit
def store_bins(
    out_ptr, arg_ptr, offsets, ok, filled, best, at, first_index, NEEDS_ARGMAX: tl.constexpr
):
    """Store maxima (0 where not `filled`) and, with NEEDS_ARGMAX, their indices
    ``first_index + at`` (-1 where not filled) at `offsets`, where `ok`; evict-first, as
    outputs are written once."""
    value = narrow(tl.where(filled, best, 0.0), out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, value, mask=ok, cache_modifier=".cs")
    if NEEDS_ARGMAX:
        winner = tl.where(filled, first_index + at, -1)
        tl.store(arg_ptr + offsets, winner, mask=ok, cache_modifier=".cs")
