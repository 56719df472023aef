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
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_NONTEMPORAL = ir.Constant(ir.IntType(32), 1)


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
