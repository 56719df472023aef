"""Software prefetch of array elements, for loops whose reads the hardware cannot predict.

The hardware prefetchers follow sequential lines and constant strides up to about 2 KiB; a loop
that reads a short run of elements from each of many rows several KiB apart (the backward's
argmax and gradient, one channel block of each ROI) gets neither, and waits for memory on every
row. A prefetch is a hint: it never faults, and on an address outside the array it only wastes
a load slot.

Importing this module imports numba.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from roi_ops_numba.lines import is_flat, item_pointer

_I8_POINTER = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)


@intrinsic
def prefetch(typingctx, array, index):
    """Hint that ``array[index]`` will be read soon: its line is brought into every cache level.

    `array` is a 1-D C-contiguous array and `index` an integer; nothing is read or checked.
    """
    if not (is_flat(array) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, arguments):
        pointer = item_pointer(context, builder, signature.args[0], *arguments)
        function = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [_I8_POINTER, _I32, _I32, _I32]),
            "llvm.prefetch.p0",
        )
        # Arguments: a read (0), high temporal locality (3), the data cache (1).
        read, locality, data = (ir.Constant(_I32, value) for value in (0, 3, 1))
        builder.call(function, [builder.bitcast(pointer, _I8_POINTER), read, locality, data])
        return context.get_dummy_value()

    return types.void(array, index), codegen
