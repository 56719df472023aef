"""64-byte vectors ("lines") as numba values, for scans that keep their running results in
registers.

LLVM's loop vectoriser only vectorises innermost loops, so a max-pooling scan written in numba
with its channel loop innermost keeps each bin's running maxima in memory: every pixel loads
and stores them again and every pixel's channel loop pays its own set-up. With a line as a value
the channel loop goes outside the pixel loop and the running maxima stay in vector registers.

A line of a 4-byte dtype has 16 lanes, of an 8-byte dtype 8. Loads and stores take a count n of
lanes (the first n; the rest are neither read nor written), so a block of channels that is not a
multiple of a line needs no second loop. LLVM lowers the operations for the machine it compiles
for (AVX-512 masked moves, AVX2 masked moves, or scalar code elsewhere); the values are the same
everywhere.

Importing this module imports numba.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LINE_BYTES = 64
_I1 = ir.IntType(1)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


class Line(types.Type):
    """The numba type of a line: `lanes` elements of the numba scalar type `dtype`."""

    def __init__(self, dtype: types.Type, lanes: int) -> None:
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Line({dtype} x {lanes})")


class LaneMask(types.Type):
    """The numba type of one flag per lane of a line."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        super().__init__(name=f"LaneMask({lanes})")


@register_model(Line)
class _LineModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


@register_model(LaneMask)
class _LaneMaskModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_I1, fe_type.lanes))


def is_flat(array) -> bool:
    """Whether numba type `array` is a 1-D C-contiguous array (what the intrinsics here and in
    `streaming` address)."""
    return isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"


def item_pointer(context, builder, array_type, array_value, index):
    """LLVM pointer to ``array[index]`` (no bounds check, no negative index), for codegen."""
    view = context.make_array(array_type)(context, builder, array_value)
    return cgutils.get_item_pointer(context, builder, array_type, view, [index], wraparound=False)


def splat(builder, value, lanes):
    """LLVM vector of `lanes` copies of `value`, for codegen."""
    vector = ir.VectorType(value.type, lanes)
    first = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, lanes), [ir.Constant(_I32, 0)] * lanes)
    return builder.shuffle_vector(first, first, zeros)


def _first_lanes(builder, lanes, count):
    """<lanes x i1>: lane < count."""
    count = builder.sext(count, _I64) if count.type.width < 64 else count
    iota = ir.Constant(ir.VectorType(_I64, lanes), [ir.Constant(_I64, i) for i in range(lanes)])
    return builder.icmp_signed("<", iota, splat(builder, count, lanes))


def _masked_memory(builder, name, line_type, dtype, lanes, arguments):
    suffix = "f" if isinstance(dtype, types.Float) else "i"
    pointer_type = arguments[1].type if name == "store" else arguments[0].type
    if name == "load":
        signature = ir.FunctionType(
            line_type, [pointer_type, _I32, ir.VectorType(_I1, lanes), line_type]
        )
    else:
        signature = ir.FunctionType(
            ir.VoidType(), [line_type, pointer_type, _I32, ir.VectorType(_I1, lanes)]
        )
    function = cgutils.get_or_insert_function(
        builder.module, signature, f"llvm.masked.{name}.v{lanes}{suffix}{dtype.bitwidth}.p0"
    )
    return builder.call(function, arguments)


@intrinsic
def lanes_of(typingctx, array):
    """The elements of `array`'s dtype in a 64-byte line (32 for 2-byte elements, 16 for 4-byte
    ones, 8 for 8-byte ones) as a compile-time constant, so that loops stepping by it compile to
    fixed strides (numba reads ``array.itemsize`` from the array at run time; the numba README
    has what that cost)."""
    if not (isinstance(array, types.Array) and array.dtype.bitwidth in (16, 32, 64)):
        return None
    lanes = LINE_BYTES * 8 // array.dtype.bitwidth

    def codegen(context, builder, signature, arguments):
        return ir.Constant(_I64, lanes)

    return types.int64(array), codegen


@intrinsic
def load_line(typingctx, array, index, count):
    """The line of ``array[index : index + count]`` (`count` from 0 to the line's lanes): lanes
    at and after `count` are 0 and their memory is not read. No bounds checks.

    `array` is a 1-D C-contiguous array of a 4- or 8-byte dtype.
    """
    if not (is_flat(array) and array.dtype.bitwidth in (32, 64)):
        return None
    if not (isinstance(index, types.Integer) and isinstance(count, types.Integer)):
        return None
    lanes = LINE_BYTES * 8 // array.dtype.bitwidth
    line = Line(array.dtype, lanes)

    def codegen(context, builder, signature, arguments):
        array_type = signature.args[0]
        array_value, index_value, count_value = arguments
        pointer = item_pointer(context, builder, array_type, array_value, index_value)
        line_type = ir.VectorType(context.get_data_type(array_type.dtype), lanes)
        width = ir.Constant(_I32, array_type.dtype.bitwidth // 8)
        mask = _first_lanes(builder, lanes, count_value)
        zero = ir.Constant(line_type, None)
        return _masked_memory(
            builder, "load", line_type, array_type.dtype, lanes, [pointer, width, mask, zero]
        )

    return line(array, index, count), codegen


@intrinsic
def store_line(typingctx, array, index, count, line):
    """``array[index : index + count] = line[:count]``; memory at and after ``index + count`` is
    not written. No bounds checks.

    `array` is a 1-D C-contiguous array of `line`'s dtype.
    """
    if not (is_flat(array) and isinstance(line, Line) and line.dtype == array.dtype):
        return None
    if not (isinstance(index, types.Integer) and isinstance(count, types.Integer)):
        return None

    def codegen(context, builder, signature, arguments):
        array_type, _, _, line_type = signature.args
        array_value, index_value, count_value, line_value = arguments
        pointer = item_pointer(context, builder, array_type, array_value, index_value)
        width = ir.Constant(_I32, array_type.dtype.bitwidth // 8)
        mask = _first_lanes(builder, line_type.lanes, count_value)
        _masked_memory(
            builder, "store", line_value.type, array_type.dtype, line_type.lanes,
            [line_value, pointer, width, mask],
        )  # fmt: skip
        return context.get_dummy_value()

    return types.void(array, index, count, line), codegen


@intrinsic
def int32_line(typingctx, value, like):
    """A line of int32 `value` in every lane, as many lanes as the line `like`."""
    if not (isinstance(value, types.Integer) and isinstance(like, Line)):
        return None
    lanes = like.lanes

    def codegen(context, builder, signature, arguments):
        scalar = context.cast(builder, arguments[0], signature.args[0], types.int32)
        return splat(builder, scalar, lanes)

    return Line(types.int32, lanes)(value, like), codegen


@intrinsic
def replaces_maximum(typingctx, candidate, best):
    """The lanes where float `candidate` replaces the running maximum `best` under the
    contract's rule: it is greater, or it is NaN and `best` is not (so the first NaN wins, and a
    tie, -0.0 against +0.0 included, keeps `best`)."""
    if not (isinstance(candidate, Line) and candidate == best):
        return None
    if not isinstance(candidate.dtype, types.Float):
        return None

    def codegen(context, builder, signature, arguments):
        x, b = arguments
        # not (x <= b) is "x > b or either is NaN"; b == b drops the lanes where b is NaN.
        return builder.and_(builder.fcmp_ordered("ord", b, b), builder.fcmp_unordered(">", x, b))

    return LaneMask(candidate.lanes)(candidate, best), codegen


@intrinsic
def choose(typingctx, mask, chosen, other):
    """Per lane: `chosen` where `mask` is set, else `other` (lines of one type)."""
    if not (isinstance(mask, LaneMask) and isinstance(chosen, Line) and chosen == other):
        return None
    if chosen.lanes != mask.lanes:
        return None

    def codegen(context, builder, signature, arguments):
        return builder.select(*arguments)

    return chosen(mask, chosen, other), codegen
