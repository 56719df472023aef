"""A/B of two versions of the CuPy kernels in one run on the GPU machine.

Variant ``old`` compiles the CUDA source given by ``--old-source`` (for example the committed one:
``git show HEAD:backends/cupy/roi_ops_cupy/roi_pool.cu > /tmp/old.cu``) beside the working tree's
kernels (variant ``unit``, launched with the working tree's plans); every other argument goes to
``scripts/gpu_probe.py``, which times the variants side by side and checks each one bit for bit
against the plane kernel on normal and tie-heavy inputs. Both sources must take the same kernel
arguments.

    python scripts/cupy_ab.py --old-source /tmp/old.cu --no-triton --no-host --profile \\
        --cupy plane old unit --dtype float32 float16
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_probe  # noqa: E402
from roi_ops_cupy import kernels  # noqa: E402

OLD_DEFINE = "-DROI_OPS_AB_OLD_SOURCE"  # marks the old variant's compile options (and cache key)


def main() -> int:
    if "--old-source" not in sys.argv[1:-1]:
        sys.exit("cupy_ab: --old-source FILE is required")
    at = sys.argv.index("--old-source")
    with open(sys.argv[at + 1], encoding="utf-8") as handle:
        old_source = handle.read()
    del sys.argv[at : at + 2]
    new_source = kernels.source

    def source() -> str:
        if OLD_DEFINE in os.environ.get(kernels.DEFINES_ENV, ""):
            return old_source
        return new_source()

    kernels.source = source
    gpu_probe.CUPY_VARIANTS["old"] = {kernels.DEFINES_ENV: OLD_DEFINE}
    return gpu_probe.main()


if __name__ == "__main__":
    sys.exit(main())
