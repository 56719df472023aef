"""The channels-last staging copy both forward kernels use for inputs whose channels are not
contiguous (NCHW and other strides), and the exact widening of float16 and bfloat16 to float32
(and back) with which the grouped kernels scan them and the backward reads 16-bit gradients.
Importing this module imports numba."""

from __future__ import annotations

import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.extending import intrinsic


@njit(cache=True, inline="always")
def _stage(src, plane0, s_c, s_h, s_w, nc, h0, h1, x0, x1, buf):
    """Copy rows h0..h1-1, columns x0..x1-1 of `nc` planes into `buf` channels-last.

    Element (c, h, w) is read from ``src[plane0 + c*s_c + h*s_h + w*s_w]`` and written to
    ``buf[((h - h0) * (x1 - x0) + (w - x0)) * nc + c]``. With a unit W stride the planes go 16 at
    a time, each pass over all rows, so the 16 planes are read as 16 long sequential streams and
    each pixel's 16 channels are written together (faster than rows outermost through 16 x 16
    transposing tiles; the README has the measurements). The other elements go one at a time.
    """
    region_w = x1 - x0
    c0 = 0
    if s_w == 1:
        while c0 + 16 <= nc:
            for h in range(h0, h1):
                d_row = (h - h0) * region_w * nc + c0
                s_row = plane0 + c0 * s_c + h * s_h + x0
                for w in range(region_w):
                    d = d_row + w * nc
                    for j in range(16):
                        buf[d + j] = src[s_row + w + j * s_c]
            c0 += 16
    for h in range(h0, h1):  # the channels left (all of them for other W strides)
        d_row = (h - h0) * region_w * nc
        s_row = plane0 + h * s_h + x0 * s_w
        for w in range(region_w):
            d = d_row + w * nc
            s = s_row + w * s_w
            for j in range(c0, nc):
                buf[d + j] = src[s + j * s_c]


# The 16-bit formats the grouped kernels stage widened to float32 (`widen_region`).
BFLOAT16 = 1
FLOAT16 = 2


@intrinsic
def float_bits(typingctx, value):
    """The bits of a float32 or float64 as an int32 or int64 (a bit cast)."""
    if value not in (types.float32, types.float64):
        return None
    width = value.bitwidth

    def codegen(context, builder, signature, arguments):
        return builder.bitcast(arguments[0], ir.IntType(width))

    return types.Integer.from_bitwidth(width)(value), codegen


def _low_bits(builder, value, width):
    """The low `width` bits of LLVM integer `value`, for codegen."""
    return value if value.type.width == width else builder.trunc(value, ir.IntType(width))


def _float_of_bits(float_type, llvm_type):
    """An intrinsic: the `float_type` whose bits are the low ones of an integer at least as wide
    (a bit cast)."""

    @intrinsic
    def of_bits(typingctx, bits):
        if not (isinstance(bits, types.Integer) and bits.bitwidth >= float_type.bitwidth):
            return None

        def codegen(context, builder, signature, arguments):
            low = _low_bits(builder, arguments[0], float_type.bitwidth)
            return builder.bitcast(low, llvm_type)

        return float_type(bits), codegen

    return of_bits


float32_of_bits = _float_of_bits(types.float32, ir.FloatType())
float64_of_bits = _float_of_bits(types.float64, ir.DoubleType())


@njit(cache=True, inline="always")
def widen(bits, kind):
    """The float32 value of a bfloat16 (`kind` BFLOAT16) or float16 (FLOAT16) element's raw
    bits: `widen_bits` as a float, exact."""
    return float32_of_bits(widen_bits(bits, kind))


@njit(cache=True, inline="always")
def widen_bits(bits, kind):
    """The float32 bit pattern (int64) of a bfloat16 (`kind` BFLOAT16) or float16 (FLOAT16)
    element's raw bits: exact, the sign of zeros and the payload of NaNs kept. Selects, no
    branches; no float operation sees a subnormal (a float16 subnormal m * 2^-24 is
    float32(m), an integer, with its exponent lowered by 24), so flush-to-zero settings cannot
    change it."""
    h = np.int64(bits) & 0xFFFF
    if kind == BFLOAT16:
        return h << 16
    sign = (h & 0x8000) << 16
    magnitude = h & 0x7FFF
    exponent = magnitude >> 10
    # Normal numbers rebias by 112; infinities and NaNs (exponent 31) by 224, to 255.
    normal = (magnitude << 13) + (np.int64(112 + 112 * (exponent == 31)) << 23)
    integer = np.int64(float_bits(np.float32(magnitude)))  # exact: magnitude < 2^10 here
    subnormal = integer - (np.int64(24) << 23) if magnitude != 0 else np.int64(0)
    return sign | (normal if exponent != 0 else subnormal)


@njit(cache=True, inline="always")
def narrow_bits(bits, kind):
    """The raw 16-bit pattern (int64) of a float32 bit pattern that `widen_bits` made (or a
    zero): the exact inverse. Selects, no branches."""
    f = np.int64(bits) & 0xFFFFFFFF
    if kind == BFLOAT16:
        return f >> 16
    sign = (f >> 16) & 0x8000
    exponent = (f >> 23) & 0xFF
    mantissa = f & 0x7FFFFF
    special = 0x7C00 | (mantissa >> 13)  # infinity or NaN, payload kept
    normal = ((exponent - 112) << 10) | (mantissa >> 13)
    shift = min(max(126 - exponent, 0), 31)
    subnormal = (mantissa | 0x800000) >> shift  # a float16 subnormal: exponent 103 to 112
    small = subnormal if exponent != 0 else np.int64(0)
    wide = special if exponent == 0xFF else normal
    return sign | (wide if exponent >= 113 else small)


@njit(cache=True)
def widen_region(narrow, widened, kind):
    """``widened[i]`` = `widen_bits` of ``narrow[i]``, the raw 16-bit elements that `_stage` copied:
    a function of its own, so that its contiguous loop is compiled (and vectorised) alone."""
    for i in range(narrow.shape[0]):
        widened[i] = widen_bits(narrow[i], kind)


@njit(cache=True)
def narrow_region(widened, narrow, kind):
    """``narrow[i]`` = `narrow_bits` of ``widened[i]``: `widen_region` undone."""
    for i in range(narrow.shape[0]):
        narrow[i] = narrow_bits(widened[i], kind)


def _converts_float16() -> bool:
    """Whether this CPU converts float16 to float32 in one instruction (x86's F16C, where LLVM
    lowers a half-to-float extension to ``vcvtph2ps``; elsewhere it may become a call into a
    runtime library that numba's JIT does not link)."""
    try:
        return "f16c" in binding.get_host_cpu_features().flatten()
    except RuntimeError:  # hosts whose features LLVM cannot read
        return False


HAS_F16C = _converts_float16()


@intrinsic
def _float16_value(typingctx, bits):
    """The float32 value of the float16 whose raw bits are the low 16 of integer `bits`, by a
    half-to-float extension: exact, except that a signalling NaN comes back quiet."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, arguments):
        half = builder.bitcast(_low_bits(builder, arguments[0], 16), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(bits), codegen


@njit(cache=True, inline="always")
def widen_summand(bits, kind):
    """`widen`, for a value that is added to a float32 at once (a gradient): with F16C a
    float16 is converted by one instruction, whose quieting of a signalling NaN the addition
    would do anyway (the sum's bits are the same)."""
    if kind == FLOAT16 and HAS_F16C:
        return _float16_value(bits)
    return widen(bits, kind)
