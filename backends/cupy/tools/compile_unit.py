"""Write the kernel source as one nvcc translation unit that instantiates every kernel.

NVRTC instantiates the templates the backend names at run time (``name_expressions``); nvcc
needs them spelled out. This writes ``kernels.source()`` followed by an array of the addresses
of every instantiation in ``kernels.all_names()``, for ``check_compile.sh``:

    python backends/cupy/tools/compile_unit.py OUT.cu
"""

from __future__ import annotations

import sys
from pathlib import Path

from roi_ops_cupy import kernels


def translation_unit() -> str:
    """The joined source and an external array that takes every kernel's address."""
    addresses = ",\n".join(f"    reinterpret_cast<const void*>(&{n})" for n in kernels.all_names())
    return (
        kernels.source()
        + "\n// Every instantiation the backend asks NVRTC for (tools/compile_unit.py).\n"
        + "extern const void* const roi_ops_instantiated[];\n"
        + f"const void* const roi_ops_instantiated[] = {{\n{addresses}\n}};\n"
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: compile_unit.py OUT.cu", file=sys.stderr)
        return 2
    Path(argv[0]).write_text(translation_unit(), encoding="utf-8")
    print(f"compile_unit: {len(kernels.all_names())} kernels in {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
