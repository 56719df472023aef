"""Tables of maxima for the cvec kernels' inference, measured before the backend builds any.

A bin of at least 2 x 2 elements can be pooled from a table of every position's 2 x 2 maximum
(and one of at least 4 x 4 from a table of 4 x 4 maxima), reading a quarter (a sixteenth) of
the elements, each square overlapping the last where a side is odd; a zero or NaN result is read
again from the map (the kernel's existing reread: a table's max.NaN, as the scan's, may lose a
zero's sign or a NaN's payload), so the output stays exact. This probe builds both tables with
torch (an upper bound on a fused build kernel's time), places them after the map in one buffer
(`[map | 2 x 2 | 4 x 4]`, N images each, so that the kernel finds them N * sN and 2 N * sN
elements after its corner) and runs the cvec kernels compiled from the backend's source with
`table_source`'s change, against the backend's own choice and torchvision, bit-checked against
the plane kernel. Float32 and 16-bit channels_last inference only (the argmax is not helped: an
entry does not say where in its square the maximum lies).

    python backends/cupy/tools/table_probe.py [--workload big-batch ...] [--dtype float32 ...]
    python backends/cupy/tools/table_probe.py --emulate   # no GPU: exactness on the emulator
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from roi_ops.backend import RoIPoolProblem
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois

from roi_ops_cupy import kernels

# (anchor in the backend's source, its replacement): cvec_bin takes the distance from the map to
# the 2 x 2 table (0: no tables, as small_cvec calls it), cvec_roi passes N * sN, and the
# inference scan reads the table that the bin's sides allow.
_CHANGES = (
    (
        "                                         CvecSlots slots) {\n  typedef Lanes<T> L;",
        "                                         CvecSlots slots, long long table_stride = 0) {\n"
        "  typedef Lanes<T> L;",
    ),
    (
        "                                 values, indices, slots);\n          }",
        "                                 values, indices, slots, num_images * sN);\n          }",
    ),
    (
        "    for (int i = 0; i < bin_h; ++i) {\n"
        "      const T* __restrict__ line = corner + i * sH;\n"
        "#pragma unroll kInferUnroll\n"
        "      for (int j = 0; j < bin_w; ++j) {\n"
        "#pragma unroll\n"
        "        for (int p = 0; p < P; ++p) {\n"
        "          const roi_vec16 v = load_vec16(line + j * sW + offset[p]);",
        "    const int s = table_stride == 0 ? 1\n"
        "                  : bin_h >= 4 && bin_w >= 4 ? 4 : bin_h >= 2 && bin_w >= 2 ? 2 : 1;\n"
        "    const T* __restrict__ table = corner + (s == 4 ? 2 : s == 2 ? 1 : 0) * table_stride;\n"
        "    for (int i0 = 0; i0 < bin_h; i0 += s) {\n"
        "      const T* __restrict__ line = table + (i0 < bin_h - s ? i0 : bin_h - s) * sH;\n"
        "#pragma unroll kInferUnroll\n"
        "      for (int j0 = 0; j0 < bin_w; j0 += s) {\n"
        "        const int j = j0 < bin_w - s ? j0 : bin_w - s;\n"
        "#pragma unroll\n"
        "        for (int p = 0; p < P; ++p) {\n"
        "          const roi_vec16 v = load_vec16(line + j * sW + offset[p]);",
    ),
)


def table_source(source: str) -> str:
    """The backend's kernel source with the cvec kernels reading the tables after the map.

    Raises:
        ValueError: the source no longer has one of the places this changes.
    """
    for anchor, replacement in _CHANGES:
        if source.count(anchor) != 1:
            raise ValueError(f"table_source: the cvec source changed; not found once: {anchor!r}")
        source = source.replace(anchor, replacement)
    return source


def _pair_max(view: torch.Tensor, d: int) -> torch.Tensor:
    """Each position's maximum with the positions d rows, d columns and both further (where they
    exist; NaN-propagating): (images, H, W, C) in, the same out."""
    rows = view.clone()
    rows[:, :-d] = torch.maximum(view[:, :-d], view[:, d:])
    out = rows.clone()
    out[:, :, :-d] = torch.maximum(rows[:, :, :-d], rows[:, :, d:])
    return out


def with_tables(x: torch.Tensor) -> torch.Tensor:
    """A (3N, C, H, W) dense channels_last buffer: x, its 2 x 2 maxima, its 4 x 4 maxima."""
    n = x.shape[0]
    buffer = torch.empty(
        (3 * n, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )
    fill_tables(x, buffer)
    return buffer


def fill_tables(x: torch.Tensor, buffer: torch.Tensor) -> None:
    """Write x and its tables into `buffer` (as `with_tables` lays them out)."""
    n = x.shape[0]
    view = buffer.permute(0, 2, 3, 1)  # (3N, H, W, C), dense
    view[:n].copy_(x.permute(0, 2, 3, 1))
    view[n : 2 * n].copy_(_pair_max(view[:n], 1))
    view[2 * n :].copy_(_pair_max(view[n : 2 * n], 2))


def _cases(device: torch.device, dtype: torch.dtype):
    """Small channels_last problems with bins of every size class, normal and tie-heavy."""
    g = torch.Generator().manual_seed(5)
    for images, channels, height, width in ((2, 32, 23, 37), (1, 64, 40, 30)):
        x = torch.randn(images, channels, height, width, generator=g)
        ties = torch.randint(-2, 2, x.shape, generator=g).float()
        ties[torch.rand(x.shape, generator=g) < 0.002] = float("nan")
        for values in (x, ties):
            rois = torch.tensor(
                [[0, 0, 0, width - 1, height - 1], [images - 1, 2.5, 1, 19, 11], [0, 3, 4, 5, 6]],
                dtype=torch.float32,
            )
            yield values.to(dtype).to(device).contiguous(memory_format=torch.channels_last), rois


def emulate() -> int:
    """Exactness on the CPU emulator: the table kernels against the plane kernel, bit for bit."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from emulator import build
    from probe import bits
    from roi_ops.device_info import CudaSizes

    from roi_ops_cupy import planning
    from roi_ops_cupy.tuning import CupyTuning

    kernels.source = (lambda own: lambda: table_source(own()))(kernels.source)
    emulator = build(Path(tempfile.mkdtemp(prefix="table-probe-")))
    sizes = CudaSizes(4, 50 << 20, 227 * 1024)
    plane = CupyTuning(forward_kernel=kernels.FORWARD_PLANE)
    checked = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for x, rois in _cases(torch.device("cpu"), dtype):
            tabled = with_tables(x)[: x.shape[0]]
            for size in (3, 7):
                reference = torch.full((rois.shape[0], x.shape[1], size, size), 2.5, dtype=dtype)
                problem = RoIPoolProblem(x, rois, size, size, 1.0, False)
                emulator.launch(planning.plan_forward(problem, reference, None, sizes, plane))
                problem = RoIPoolProblem(tabled, rois, size, size, 1.0, False)
                for kernel in (kernels.FORWARD_CVEC, kernels.FORWARD_CVEC_WIDE):
                    out = torch.full_like(reference, 1.5)
                    tuning = CupyTuning(forward_kernel=kernel)
                    emulator.launch(planning.plan_forward(problem, out, None, sizes, tuning))
                    if not torch.equal(bits(out), bits(reference)):
                        print(f"table_probe: MISMATCH {kernel} {dtype} {tuple(x.shape)} {size}")
                        return 1
                    checked += 1
    print(f"table_probe: {checked} emulated cases equal to the plane kernel")
    return 0


def measure(w, dtype: torch.dtype, variants: dict, args) -> int:
    """One workload and dtype: prints its times; returns its bit mismatches (0 to 2)."""
    from probe import bits, pipelined_ms, tie_heavy

    device = torch.device("cuda")
    x = make_input(w, dtype, device, channels_last=True)
    rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, device)
    size, n = w.output_size, x.shape[0]
    buffer = with_tables(x)
    shape = (rois.shape[0], w.channels, size, size)
    out = torch.empty(shape, dtype=dtype, device=device)
    problem = RoIPoolProblem(x, rois, size, size, w.spatial_scale, False)
    tabled = RoIPoolProblem(buffer[:n], rois, size, size, w.spatial_scale, False)
    auto_ms = pipelined_ms(variants["auto"].runner(problem, out, None), args.reps, args.inner)
    tables_ms = pipelined_ms(variants["tables"].runner(tabled, out, None), args.reps, args.inner)
    build_ms = pipelined_ms(lambda: fill_tables(x, buffer), args.reps, args.inner)
    tv_ms = float("nan")
    if dtype != torch.bfloat16:
        from torchvision.ops import roi_pool as tv

        rois_tv = rois.to(dtype)
        tv_ms = pipelined_ms(lambda: tv(x, rois_tv, size, w.spatial_scale), args.reps, args.inner)
    mismatches = 0
    for values in (x, tie_heavy(x)):
        fill_tables(values, buffer)
        reference = torch.full_like(out, float("nan"))
        plain = RoIPoolProblem(values, rois, size, size, w.spatial_scale, False)
        variants["plane"].runner(plain, reference, None)()
        result = torch.full_like(out, 1.5)
        variants["tables"].runner(tabled, result, None)()
        if not torch.equal(bits(result), bits(reference)):
            mismatches += 1
            print(f"MISMATCH {w.name} {dtype}")
    total = tables_ms + build_ms
    print(
        f"{w.name:10} {str(dtype)[6:]:8} tv {tv_ms:.3f}  auto {auto_ms:.3f}  tables {tables_ms:.3f}"
        f" (+ build {build_ms:.3f} = {total:.3f})  auto/(tables+build) {auto_ms / total:.2f}x",
        flush=True,
    )
    return mismatches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--dtype", nargs="*", default=["float32", "float16"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--emulate", action="store_true", help="no GPU: check exactness only")
    args = parser.parse_args()
    if args.emulate:
        return emulate()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe import VARIANTS, Variant

    variants = {
        "auto": Variant("auto", VARIANTS["auto"]),
        "tables": Variant("tables", VARIANTS["auto"], table_source(kernels.source())),
        "plane": Variant("plane", VARIANTS["plane"]),
    }
    print("ms: torchvision, the backend's choice, the table kernels alone, the tables' build")
    mismatches = sum(
        measure(WORKLOADS[name], getattr(torch, dtype), variants, args)
        for name in args.workload
        for dtype in args.dtype
    )
    print(f"bit checks: {mismatches} mismatches")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
