"""Streaming (non-temporal) stores for outputs that are written once and not read back.

A plain store to a line that is not in cache first reads the line from memory (read for
ownership), then writes it back when it is evicted: a forward whose outputs are much larger than
the caches moves each output byte twice. A non-temporal store writes whole lines straight to
memory from a write-combining buffer. On x86 such stores are not ordered with other stores, so a
thread that streamed must run `store_fence` before another thread (or the caller, after the
parallel region) may read what it wrote. Elsewhere LLVM emits a plain or a non-temporal pair
store: the values stored are the same either way.

Importing this module imports numba.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from roi_ops_numba.lines import LINE_BYTES, is_flat, item_pointer, lanes_of, splat
from roi_ops_numba.staging import BFLOAT16, FLOAT16, narrow_bits

_I1 = ir.IntType(1)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_NONTEMPORAL = ir.Constant(_I32, 1)


@intrinsic
def stream_store(typingctx, array, index, value):
    """``array[index] = value`` as a non-temporal store (no bounds check, no negative index).

    `array` is a 1-D C-contiguous array of a float or integer dtype and `value` of that dtype.
    Floats are stored as their bits through an integer of the same width, which x86 can store
    non-temporally (``movnti``) where it has no scalar float form; a value loaded from memory
    stays in an integer register that way (one just computed in a float register is stored
    plainly: LLVM folds the bit cast into a float store).
    """
    if not (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"):
        return None
    if not isinstance(index, types.Integer) or value != array.dtype:
        return None

    def codegen(context, builder, signature, arguments):
        array_type = signature.args[0]
        array_value, index_value, stored = arguments
        view = context.make_array(array_type)(context, builder, array_value)
        pointer = cgutils.get_item_pointer(
            context, builder, array_type, view, [index_value], wraparound=False
        )
        if isinstance(array_type.dtype, types.Float):
            bits = ir.IntType(array_type.dtype.bitwidth)
            stored = builder.bitcast(stored, bits)
            pointer = builder.bitcast(pointer, bits.as_pointer())
        store = builder.store(stored, pointer)
        store.set_metadata("nontemporal", builder.module.add_metadata([_NONTEMPORAL]))
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def store_fence(typingctx):
    """A sequentially consistent fence: every store this thread made, streamed ones included,
    is visible before any later load or store of the thread (``mfence`` on x86)."""

    def codegen(context, builder, signature, arguments):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def _gather(context, builder, src_type, src_value, index_type, index_value, i_value, lanes):
    """LLVM vector of ``src[index[i + l]]`` for the `lanes` lanes l (one masked gather, every
    lane on), for codegen; `src` a 1-D C-contiguous array of a 4- or 8-byte dtype, `index`
    int32."""
    width = src_type.dtype.bitwidth // 8
    line = ir.VectorType(context.get_data_type(src_type.dtype), lanes)
    where = item_pointer(context, builder, index_type, index_value, i_value)
    indices = builder.load(
        builder.bitcast(where, ir.VectorType(_I32, lanes).as_pointer()), align=4
    )  # the table's elements are only 4-byte aligned
    offsets = builder.mul(
        builder.sext(indices, ir.VectorType(_I64, lanes)),
        splat(builder, ir.Constant(_I64, width), lanes),
    )
    base = item_pointer(context, builder, src_type, src_value, ir.Constant(_I64, 0))
    start = splat(builder, builder.ptrtoint(base, _I64), lanes)
    pointers = builder.inttoptr(builder.add(start, offsets), ir.VectorType(base.type, lanes))
    kind = "f" if isinstance(src_type.dtype, types.Float) else "i"
    gather = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(line, [pointers.type, _I32, ir.VectorType(_I1, lanes), line]),
        f"llvm.masked.gather.v{lanes}{kind}{width * 8}.v{lanes}p0",
    )
    every = ir.Constant(ir.VectorType(_I1, lanes), [ir.Constant(_I1, 1)] * lanes)
    return builder.call(
        gather, [pointers, ir.Constant(_I32, width), every, ir.Constant(line, ir.Undefined)]
    )


@intrinsic
def stream_gathered_line(typingctx, dst, d, src, index, i):
    """``dst[d + l] = src[index[i + l]]`` for the ``64 // itemsize`` elements l of one line, as
    one gathering vector load and one aligned non-temporal vector store (no bounds checks).

    `dst` and `src` are 1-D C-contiguous arrays of one 4- or 8-byte dtype, `index` int32; the
    address of ``dst[d]`` must be a multiple of 64 (an unaligned one faults on x86).
    """
    if not (is_flat(dst) and is_flat(src) and is_flat(index)):
        return None
    if dst.dtype != src.dtype or dst.dtype.bitwidth not in (32, 64) or index.dtype != types.int32:
        return None
    if not (isinstance(d, types.Integer) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, arguments):
        dst_type, _, src_type, index_type, _ = signature.args
        dst_value, d_value, src_value, index_value, i_value = arguments
        lanes = LINE_BYTES * 8 // dst_type.dtype.bitwidth
        value = _gather(
            context, builder, src_type, src_value, index_type, index_value, i_value, lanes
        )
        target = item_pointer(context, builder, dst_type, dst_value, d_value)
        store = builder.store(
            value, builder.bitcast(target, value.type.as_pointer()), align=LINE_BYTES
        )
        store.set_metadata("nontemporal", builder.module.add_metadata([_NONTEMPORAL]))
        return context.get_dummy_value()

    return types.void(dst, d, src, index, i), codegen


def _narrow_float16(builder, patterns, lanes):
    """`staging.narrow_bits` (float16) of a vector of int32 float32 patterns, in 32-bit lanes:
    the float16 bits in each lane's low half. The scalar version's int64 arithmetic does the
    same in half as many lanes."""

    def const(value):
        return splat(builder, ir.Constant(_I32, value), lanes)

    sign = builder.and_(builder.lshr(patterns, const(16)), const(0x8000))
    exponent = builder.and_(builder.lshr(patterns, const(23)), const(0xFF))
    mantissa = builder.and_(patterns, const(0x7FFFFF))
    top = builder.lshr(mantissa, const(13))
    special = builder.or_(top, const(0x7C00))  # infinity or NaN, payload kept
    normal = builder.or_(builder.shl(builder.sub(exponent, const(112)), const(10)), top)
    # A float16 subnormal (float32 exponent 103 to 112): the mantissa with its implicit bit,
    # shifted right by 126 - exponent (at most 31: larger exponents never select it).
    below = builder.sub(const(126), exponent)
    positive = builder.select(builder.icmp_signed(">", below, const(0)), below, const(0))
    shift = builder.select(builder.icmp_signed("<", positive, const(31)), positive, const(31))
    subnormal = builder.lshr(builder.or_(mantissa, const(0x800000)), shift)
    small = builder.select(builder.icmp_signed("!=", exponent, const(0)), subnormal, const(0))
    wide = builder.select(builder.icmp_signed("==", exponent, const(0xFF)), special, normal)
    magnitude = builder.select(builder.icmp_signed(">=", exponent, const(113)), wide, small)
    return builder.or_(sign, magnitude)


@intrinsic
def stream_halves_gathered_line(typingctx, dst, d, src, index, i, kind):
    """``dst[d + l] = staging.narrow_bits(src[index[i + l]], kind)`` for 16 lanes l: one
    gathering vector load of float32 patterns of widened 16-bit values, narrowed in 32-bit
    vector lanes (bfloat16: the high half; float16: `_narrow_float16`), stored as one aligned
    non-temporal 32-byte vector. No bounds checks.

    `dst` is a 1-D C-contiguous int16 array, `src` and `index` int32 ones, `kind` a literal
    `staging.BFLOAT16` or `staging.FLOAT16`; the address of ``dst[d]`` must be a multiple of
    32.
    """
    if not (is_flat(dst) and is_flat(src) and is_flat(index)):
        return None
    if dst.dtype != types.int16 or src.dtype != types.int32 or index.dtype != types.int32:
        return None
    if not (isinstance(d, types.Integer) and isinstance(i, types.Integer)):
        return None
    if not isinstance(kind, types.IntegerLiteral) or kind.literal_value not in (BFLOAT16, FLOAT16):
        return None
    lanes = 16
    float16 = kind.literal_value == FLOAT16

    def codegen(context, builder, signature, arguments):
        dst_type, _, src_type, index_type, _, _ = signature.args
        dst_value, d_value, src_value, index_value, i_value, _ = arguments
        patterns = _gather(
            context, builder, src_type, src_value, index_type, index_value, i_value, lanes
        )
        if float16:
            narrow = _narrow_float16(builder, patterns, lanes)
        else:
            narrow = builder.lshr(patterns, splat(builder, ir.Constant(_I32, 16), lanes))
        halves = builder.trunc(narrow, ir.VectorType(ir.IntType(16), lanes))
        target = item_pointer(context, builder, dst_type, dst_value, d_value)
        store = builder.store(halves, builder.bitcast(target, halves.type.as_pointer()), align=32)
        store.set_metadata("nontemporal", builder.module.add_metadata([_NONTEMPORAL]))
        return context.get_dummy_value()

    return types.void(dst, d, src, index, i, kind), codegen


@njit(cache=True, inline="always")
def _stream_narrowed(dst, src, index, kind):
    """`stream_halves_gathered` for a literal `kind`."""
    size = dst.shape[0]
    address = dst.ctypes.data
    head = size
    if address % 2 == 0:
        head = min((-address) % 32 // 2, size)
    body = head + (size - head) // 16 * 16
    for o in range(head):
        dst[o] = narrow_bits(src[index[o]], kind)
    for o in range(head, body, 16):
        stream_halves_gathered_line(dst, o, src, index, o, kind)
    for o in range(body, size):
        dst[o] = narrow_bits(src[index[o]], kind)


@njit(cache=True, inline="always")
def stream_halves_gathered(dst, src, index, kind):
    """``dst[o] = staging.narrow_bits(src[index[o]], kind)`` for every o of `dst` (int16), from
    the float32 patterns of widened bfloat16 (`kind` BFLOAT16) or float16 (FLOAT16) values in
    `src` (int32): aligned 32-byte runs by `stream_halves_gathered_line` (gathered, narrowed in
    vector lanes, non-temporal), the elements outside them plainly. The caller runs
    `store_fence` before anyone reads `dst`."""
    if kind == BFLOAT16:
        _stream_narrowed(dst, src, index, BFLOAT16)
    else:
        _stream_narrowed(dst, src, index, FLOAT16)


@njit(cache=True, inline="always")
def stream_gathered(dst, src, index):
    """``dst[o] = src[index[o]]`` for every o of `dst`, with non-temporal stores: whole 64-byte
    lines of `dst` by `stream_gathered_line`, the elements outside them by `stream_store`.

    `dst` and `src` are 1-D C-contiguous arrays of one 4- or 8-byte dtype, `index` int32 with at
    least as many elements as `dst`, each a valid index of `src` (not checked). The caller runs
    `store_fence` before anyone reads `dst`.
    """
    size = dst.shape[0]
    lanes = lanes_of(dst)
    width = LINE_BYTES // lanes
    address = dst.ctypes.data
    head = size  # elements not aligned to their size never reach a line's start
    if address % width == 0:
        head = min((-address) % LINE_BYTES // width, size)
    body = head + (size - head) // lanes * lanes
    for o in range(head):
        stream_store(dst, o, src[index[o]])
    for o in range(head, body, lanes):
        stream_gathered_line(dst, o, src, index, o)
    for o in range(body, size):
        stream_store(dst, o, src[index[o]])
