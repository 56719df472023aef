"""GPU probe of the staged forward's channels_last copy: the tree's kernel against variants of it,
on the bench workloads' maps, kernels alone, in one run.

Not a benchmark of record. Each variant is the tree's kernel (cuda/copy_channels_last.cu) with
one or more of: the grid's channel tiles running fastest (so that blocks running together write
whole positions, `c`), more positions a block (`p128`, `p256`). Each figure is the median over
rounds (the variants alternating) of `--inner` back-to-back launches between two CUDA events;
every variant's copy is checked bit for bit against torch's. Run on the GPU machine:

    python backends/cupy/tools/copy_probe.py [--workload fpn-p4 ...] [--dtype float32 ...]
        [--rounds 7] [--inner 20]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import cupy
import torch
from roi_ops.bench.workloads import WORKLOADS, make_input

from roi_ops_cupy import kernels, launch

# The tree's kernel with the positions a block and the grid's order as template arguments.
VARIANT = r"""
template <class T, int kPositions, bool kChannelsFirst>
__global__ void __launch_bounds__(32 * roi_ops_cuda::kCopyRows)
    copy_variant(const T* __restrict__ input, const i64 C64, const i64 H64, const i64 W64,
                 const i64 sN, const i64 sC64, const i64 sH64, const i64 position_tiles64,
                 const i64 channel_tiles64, T* __restrict__ output) {
  using namespace roi_ops_cuda;
  typedef typename TileBits<sizeof(T)>::type B;
  constexpr int kChannels = CopyTile<T>::kChannels;
  constexpr int kVector = CopyTile<T>::kVector;
  constexpr int kVectors = kChannels / kVector;
  __shared__ B tile[kPositions][kChannels];
  const int C = static_cast<int>(C64), W = static_cast<int>(W64), sC = static_cast<int>(sC64);
  const int sH = static_cast<int>(sH64), position_tiles = static_cast<int>(position_tiles64);
  const int HW = static_cast<int>(H64) * W;
  int n, p0, c0;
  if (kChannelsFirst) {
    const int channel_tiles = static_cast<int>(channel_tiles64);
    const int linear = static_cast<int>(blockIdx.x);
    const int rest = linear / channel_tiles;
    c0 = (linear - rest * channel_tiles) * kChannels;
    n = rest / position_tiles;
    p0 = (rest - n * position_tiles) * kPositions;
  } else {
    n = static_cast<int>(blockIdx.x) / position_tiles;
    p0 = (static_cast<int>(blockIdx.x) - n * position_tiles) * kPositions;
    c0 = static_cast<int>(blockIdx.y) * kChannels;
  }
  const B* __restrict__ image = reinterpret_cast<const B*>(input) + n * sN + c0 * sC;
  const bool dense = sH == W;
  const bool pairs = sizeof(T) == 2 && dense && HW % 2 == 0 && sC % 2 == 0 && sN % 2 == 0 &&
                     reinterpret_cast<unsigned long long>(input) % 4u == 0;
  if (pairs) {
#pragma unroll
    for (int x = 2 * threadIdx.x; x < kPositions; x += 64) {
      if (p0 + x < HW) {
        const unsigned int* __restrict__ words =
            reinterpret_cast<const unsigned int*>(image + p0 + x);
#pragma unroll
        for (int r = threadIdx.y; r < kChannels; r += kCopyRows) {
          if (c0 + r < C) {
            const unsigned int both = words[r * sC / 2];
            tile[x][(r + CopyTile<T>::turn(x)) % kChannels] = static_cast<B>(both);
            tile[x + 1][(r + CopyTile<T>::turn(x + 1)) % kChannels] = static_cast<B>(both >> 16);
          }
        }
      }
    }
  } else {
#pragma unroll
    for (int x = threadIdx.x; x < kPositions; x += 32) {
      const int p = p0 + x;
      if (p < HW) {
        int offset = p;
        if (!dense) {
          const int h = p / W;
          offset = h * sH + (p - h * W);
        }
#pragma unroll
        for (int r = threadIdx.y; r < kChannels; r += kCopyRows) {
          if (c0 + r < C) {
            tile[x][(r + CopyTile<T>::turn(x)) % kChannels] = image[offset + r * sC];
          }
        }
      }
    }
  }
  __syncthreads();
  const int thread = threadIdx.y * 32 + threadIdx.x;
  const int first = (thread % kVectors) * kVector;
  if (c0 + first >= C) return;
  B* __restrict__ target = reinterpret_cast<B*>(output) + (static_cast<i64>(n) * HW + p0) * C +
                           c0 + first;
  const bool vectors =
      C % kVector == 0 && reinterpret_cast<unsigned long long>(output) % 16u == 0;
  constexpr int kStep = 32 * kCopyRows / kVectors;
#pragma unroll
  for (int q = thread / kVectors; q < kPositions; q += kStep) {
    if (p0 + q >= HW) break;
    const B* __restrict__ row = tile[q];
    const int turn = first + CopyTile<T>::turn(q);
    if (sizeof(T) == 2 && vectors) {
      const unsigned int* __restrict__ words = reinterpret_cast<const unsigned int*>(row);
      roi_vec16 piece;
#pragma unroll
      for (int k = 0; k < 4; ++k) piece.w[k] = words[(turn / 2 + k) % (kChannels / 2)];
      *reinterpret_cast<roi_vec16*>(target + q * C) = piece;
    } else if (vectors) {
      union {
        roi_vec16 piece;
        B values[kVector];
      } bits;
#pragma unroll
      for (int k = 0; k < kVector; ++k) bits.values[k] = row[(turn + k) % kChannels];
      *reinterpret_cast<roi_vec16*>(target + q * C) = bits.piece;
    } else {
      for (int k = 0; k < kVector && c0 + first + k < C; ++k) {
        target[q * C + k] = row[(turn + k) % kChannels];
      }
    }
  }
}
"""

# name: (positions a block, channel tiles fastest)
VARIANTS = {
    "p64": (64, False),
    "p64c": (64, True),
    "p128": (128, False),
    "p128c": (128, True),
    "p256c": (256, True),
}


def variant_name(dtype: torch.dtype, positions: int, channels_first: bool) -> str:
    first = "true" if channels_first else "false"
    return f"copy_variant<{kernels.C_TYPES[dtype]}, {positions}, {first}>"


def compile_variants(dtypes) -> dict[str, object]:
    names = [variant_name(d, p, c) for d in dtypes for p, c in VARIANTS.values()]
    module = cupy.RawModule(
        code=kernels.source() + VARIANT, options=kernels.COMPILE_OPTIONS, name_expressions=names
    )
    device = torch.cuda.current_device()
    for name in names:
        launch._kernels[(device, name)] = module.get_function(name)
    return names


def variant_launch(x, out, positions, channels_first) -> kernels.Launch:
    n, c, h, w = x.shape
    position_tiles = math.ceil(h * w / positions)
    channel_tiles = math.ceil(c / kernels.copy_channels(x.dtype))
    args = (
        kernels.pointer("input", x),
        *(kernels.integer(k, v) for k, v in zip("CHW", (c, h, w), strict=True)),
        *(kernels.integer(k, v) for k, v in zip(("sN", "sC", "sH"), x.stride()[:3], strict=True)),
        kernels.integer("position_tiles", position_tiles),
        kernels.integer("channel_tiles", channel_tiles),
        kernels.pointer("output", out),
    )
    if channels_first:
        grid = (n * position_tiles * channel_tiles, 1, 1)
    else:
        grid = (n * position_tiles, channel_tiles, 1)
    name = variant_name(x.dtype, positions, channels_first)
    return kernels.Launch(name, grid, (32, kernels.COPY_ROWS, 1), 0, args)


def tree_launch(x, out) -> kernels.Launch:
    from roi_ops_cupy import planning

    return planning.plan_copy_channels_last(x, out)


def time_ms(fn, inner: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


def probe(name: str, x: torch.Tensor, args) -> None:
    device = x.get_device()
    reference = x.contiguous(memory_format=torch.channels_last)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    calls, same = {}, {}
    plans = {"tree": tree_launch}
    for label, (positions, first) in VARIANTS.items():
        plans[label] = lambda a, b, p=positions, f=first: variant_launch(a, b, p, f)
    for label, plan in plans.items():
        out = torch.empty_like(reference)
        out.view(bits).fill_(-1)
        packed = launch.PackedLaunch(device, plan(x, out), ())
        packed.launch(device, ())
        torch.cuda.synchronize()
        same[label] = torch.equal(out.view(bits), reference.view(bits))
        calls[label] = lambda p=packed: p.launch(device, ())
    calls["torch"] = lambda: x.contiguous(memory_format=torch.channels_last)
    samples = {label: [] for label in calls}
    for _ in range(args.rounds):
        for label, fn in calls.items():
            samples[label].append(time_ms(fn, args.inner))
    moved = 2 * x.numel() * x.element_size()
    tree = statistics.median(samples["tree"])
    cells = []
    for label, v in samples.items():
        ms = statistics.median(v)
        spread = (max(v) - min(v)) / ms
        mark = "" if same.get(label, True) else " DIFFER"
        cells.append(
            f"{label} {ms * 1000:.1f}us {moved / ms / 1e6:.0f}GB/s {tree / ms:.2f}x "
            f"({spread:.0%}){mark}"
        )
    print(f"{name:10} {str(x.dtype)[6:]:8} " + " | ".join(cells), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--dtype", nargs="*", default=["float32", "float16"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=20)
    args = parser.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtype]
    compile_variants(dtypes)
    gpu = torch.cuda.get_device_name()
    print(f"copy_probe on {gpu}: us per launch, medians of {args.rounds} rounds of {args.inner}")
    for dtype in dtypes:
        for w in args.workload:
            probe(w, make_input(WORKLOADS[w], dtype, torch.device("cuda")), args)
        # The fpn-multi pyramid's levels (P2 to P5 of 800 x 1088, N=8, C=256).
        for level, (h, wd) in enumerate(((200, 272), (100, 136), (50, 68), (25, 34)), start=2):
            x = torch.randn(8, 256, h, wd, device="cuda").to(dtype)
            probe(f"P{level}", x, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
