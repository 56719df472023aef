"""Compile every NVRTC module of the CuPy backend once, in parallel, into CuPy's kernel cache.

On a freshly started GPU machine each pytest worker compiles the modules its tests need on its
own; run first, this fills CuPy's on-disk cache (``CUPY_CACHE_DIR``, keyed by source, options,
architecture and name expressions) once, a module a process, so that the workers load cubins
instead. ``scripts/gpu_check.sh`` runs it before the GPU tests. Run on the GPU machine:

    python backends/cupy/tools/warm_kernels.py [--workers 16] [--device 0]
    python backends/cupy/tools/warm_kernels.py --list    # the modules, one kernel each (no GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from roi_ops_cupy import kernels


def module_leaders() -> list[str]:
    """One kernel name per NVRTC module (`kernels.module_names`), covering `kernels.all_names`,
    the modules of most kernels first (the longest compiles start first)."""
    leaders: dict[tuple[str, ...], str] = {}
    for name in kernels.all_names():
        leaders.setdefault(kernels.module_names(name), name)
    return [leaders[m] for m in sorted(leaders, key=len, reverse=True)]


def _compile(device: int, name: str) -> float:
    """Seconds to compile (or load from the cache) the module of kernel `name` on `device`."""
    from roi_ops_cupy import launch

    started = time.perf_counter()
    launch.compiled_kernel(device, name)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the modules' kernels and stop")
    args = parser.parse_args()
    leaders = module_leaders()
    if args.list:
        print("\n".join(leaders))
        return 0
    started = time.perf_counter()
    # spawn: each process initialises CUDA itself (a forked CUDA context is unusable).
    with ProcessPoolExecutor(
        min(args.workers, len(leaders)), mp_context=get_context("spawn")
    ) as pool:
        seconds = list(pool.map(_compile, [args.device] * len(leaders), leaders))
    print(
        f"warm_kernels: {len(leaders)} modules in {time.perf_counter() - started:.1f} s "
        f"(slowest {max(seconds):.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
