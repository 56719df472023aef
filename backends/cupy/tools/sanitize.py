"""Adversarial roi_pool calls for compute-sanitizer (memcheck, racecheck), value checks off.

    compute-sanitizer --tool memcheck python backends/cupy/tools/sanitize.py --backend cupy triton

`cupy-planes` runs the cupy backend with its planes backward forced (the cases are too small for
it to be chosen), `cupy-tables` with the tables of maxima built and read in every inference that
can read them, each through a `Launcher` with another `CupyTuning`.

Each case is also compared with the scalar reference, so a silent wrong result fails too.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import replace

import torch
from roi_ops.testing import check_case
from roi_ops.testing.cases import RoiPoolCase, contract_cases

HOSTILE_ROWS = [
    [5.0, 0, 0, 3, 3],
    [-1.0, 0, 0, 3, 3],
    [0.0, math.nan, 0, 3, 3],
    [1.0, 0, 0, math.inf, 3],
    [0.0, -1e30, -1e30, 1e30, 1e30],
    [1.0, 1e7, 1e7, 2e7, 2e7],
    [0.9, -50, -50, -10, -10],
    [1.0, 3, 3, 1, 1],
    [0.0, 0, 0, 63, 63],
    [math.nan, 1, 1, 2, 2],
]


def cases(device: str) -> list[RoiPoolCase]:
    out = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        out += contract_cases(device, dtype, seed=9)
        rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        rows = torch.tensor(HOSTILE_ROWS, dtype=torch.float64)
        if dtype == torch.float16:
            rows = rows.clamp(-6e4, 6e4)
        # channels_last with 5 channels takes the plane kernel; with 24 the cvec kernel (whole
        # 16-byte vectors); with 20, cvec for float32 and float64 (a thread's second vector
        # missing) and the chan kernel for the 16-bit types.
        for layout in ("contiguous", "channels_last", "cl24", "cl20", "expanded"):
            channels = {"cl24": 24, "cl20": 20}.get(layout, 5)
            x = torch.randn(2, channels, 9, 11)
            if layout in ("channels_last", "cl24", "cl20"):
                x = x.contiguous(memory_format=torch.channels_last)
            if layout == "expanded":
                x = torch.randn(1, 5, 1, 11).expand(2, 5, 9, 11)
            out.append(
                RoiPoolCase(
                    f"hostile-{layout}",
                    x.to(dtype).to(device),
                    rows.to(rois_dtype).to(device),
                    (3, 40),
                    0.5,
                    True,
                )
            )
        for shape in ((0, 3, 5, 5), (2, 3, 0, 5), (2, 3, 5, 0)):
            out.append(
                RoiPoolCase(
                    "empty",
                    torch.randn(shape).to(dtype).to(device),
                    rows[:3].to(rois_dtype).to(device),
                    4,
                    1.0,
                    True,
                )
            )
    return out


@contextlib.contextmanager
def tuned(**changes):
    """The cupy backend planning with its default tuning so changed (a forced choice)."""
    from roi_ops_cupy import launch
    from roi_ops_cupy.tuning import DEFAULT_TUNING

    default = launch.DEFAULT_LAUNCHER
    launch.DEFAULT_LAUNCHER = launch.Launcher(replace(DEFAULT_TUNING, **changes))
    try:
        yield
    finally:
        launch.DEFAULT_LAUNCHER = default


def _kernel(name: str) -> str:
    from roi_ops_cupy import kernels

    return getattr(kernels, name)


# Pseudo-backends: a backend run with a forced choice (the planes backward scanning or reading
# the grouping launch's lists; the tables of maxima).
FORCED = {
    "cupy-planes": ("cupy", lambda: tuned(backward_kernel=_kernel("BACKWARD_PLANES"))),
    "cupy-planes-grouped": (
        "cupy",
        lambda: tuned(backward_kernel=_kernel("BACKWARD_PLANES_GROUPED")),
    ),
    "cupy-tables": ("cupy", lambda: tuned(max_tables=True)),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--backend", nargs="+", default=["cupy", "triton"], help=f"also: {', '.join(FORCED)}"
    )
    args = parser.parse_args()
    count = 0
    for name in args.backend:
        backend, forced = FORCED.get(name, (name, contextlib.nullcontext))
        with forced():
            for case in cases("cuda"):
                check_case(case, backend)
                count += 1
    torch.cuda.synchronize()
    print(f"sanitize cases passed: {count} ({', '.join(args.backend)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
