// ---- roi_pool_backward_planes<T, R, kBlock>: gradient planes summed in shared memory --------
// The backward without global atomics or zero fill. One block per (image, channel block) keeps
// the block's gradient planes (channels_per_block * HW accumulators, float32 for the 16-bit
// types) in dynamic shared memory, finds its image's ROIs 1024 at a time (four per thread in
// 256-thread blocks; in order, by block-wide ballots; the next round's batch indices load while
// this round's gradients are added), adds their gradients there with shared-memory atomics and
// writes the planes out once, rounded: grad_input needs no zero fill and no conversion pass.
// kBlock is 256, or 1024 for planes so large that one block fills an SM's shared memory (enough
// loads in flight). Each thread walks its elements (ROI of the round, channel, bin) in steps of
// the block with a mixed-radix counter, so the inner loop has no division (add_round). A dense
// grad_output (the argmax's strides) is addressed with one 32-bit offset per element; any
// other through its strides and a table of the bins' offsets. Grid: N * ceil(C /
// channels_per_block) blocks, channel block fastest; kBlock threads; dynamic shared memory
// PH * PW * 8 + channels_per_block * HW * sizeof(accumulator) bytes. grad_input (N, C, H, W)
// of T, contiguous or channels_last. Requires channels_per_block * PH * PW * kBlock < 2^31 and
// K < 2^31. Not run-to-run deterministic (the order of the shared-memory additions varies).
// Arguments as the atomic kernel's (grad_input of T, in either layout), then K.
namespace roi_ops_cuda {
constexpr int kPlanesUnroll = 4;  // independent (argmax, gradient) loads in flight per thread

// A float32 (float64) sum rounded once to the gradient's dtype, as torch's CUDA .to() rounds:
// Work<T>::out, except for bfloat16, whose Work::out only narrows values that came from
// bfloat16 (it keeps NaN payloads for the forward) and does not round.
template <class T>
struct Rounded {
  static __device__ __forceinline__ T of(typename Work<T>::V v) { return Work<T>::out(v); }
};
template <>
struct Rounded<roi_bf16> {
  static __device__ __forceinline__ roi_bf16 of(float v) {
    roi_bf16 b;
    b.bits = float_to_bf16(v);
    return b;
  }
};

// Blocks per SM in the planes kernel's launch bounds: 5 of 256 threads (4 for float64, whose
// 64-bit addresses and sums need more than 48 registers on sm_80, and for the kernel over levels,
// whose level table and three addressing loops do too), or 1 of 1024.
template <class T, int kBlock, bool kLevels = false>
struct PlanesBlocksPerSM {
  static constexpr int value = kBlock == 256 ? (sizeof(T) == 8 || kLevels ? 4 : 5) : 1;
};

// How a round addresses its elements. kStrided: round_rois holds ROI indices k, and the offsets
// are 64-bit, from the gradient's strides (gs0, gs1 and the bins' table) and the argmax's (C,
// channel c0 + c). kDense: grad_output has the argmax's strides and K * C * PH * PW < 2^31, and
// round_rois holds each ROI's 32-bit offset of the block's first channel, (k * C + c0) * PH * PW,
// to which c * bins + q adds the element's, for the argmax and grad_output alike. kDenseOne:
// kDense for one channel a block (the default), walking (ROI, bin) only.
enum RoundAddressing { kStrided, kDense, kDenseOne };

// One round of the planes kernel: adds the gradients of the round's `found` ROIs (round_rois)
// to the block's planes (`pixels` accumulators each), each thread walking its elements from
// `start` in steps of the block. Fewer instructions per element is what speeds this loop: it
// is bound by issue and by the shared-memory atomics (a compare-and-swap loop for floats).
template <class A, int kBlock, RoundAddressing kMode, class T>
__device__ __forceinline__ void add_round(
    const T* __restrict__ grad_output, const int* __restrict__ argmax,
    const int* __restrict__ round_rois, const unsigned int found, const OutputWalk& start,
    const i64 gs0, const i64 gs1, const i64 C, const i64* __restrict__ bin_offset, const i64 c0,
    A* __restrict__ planes, const unsigned int pixels) {
  const unsigned int bins = start.bins;
  const unsigned int elements = found * start.channels * bins;
  if constexpr (kMode == kDenseOne) {
    unsigned int r = start.r, q = start.q;
    const unsigned int step_r = start.step_r, step_q = start.step_q;
    for (unsigned int e0 = threadIdx.x; e0 < elements; e0 += kPlanesUnroll * kBlock) {
      int a[kPlanesUnroll];
      A g[kPlanesUnroll];
#pragma unroll
      for (int u = 0; u < kPlanesUnroll; ++u) {
        a[u] = -1;
        g[u] = A(0);
        if (r < found) {
          const unsigned int offset = static_cast<unsigned int>(round_rois[r]) + q;
          a[u] = __ldcs(argmax + offset);  // read once: evict first
          g[u] = static_cast<A>(Elem<T>::value_of(grad_output[offset]));
        }
        q += step_q;
        r += step_r;
        if (q >= bins) {
          q -= bins;
          ++r;
        }
      }
#pragma unroll
      for (int u = 0; u < kPlanesUnroll; ++u) {
        if (a[u] >= 0) atomicAdd(planes + a[u], g[u]);
      }
    }
  } else {
    OutputWalk at = start;
    for (unsigned int e0 = threadIdx.x; e0 < elements; e0 += kPlanesUnroll * kBlock) {
      int a[kPlanesUnroll];
      A g[kPlanesUnroll];
      unsigned int plane[kPlanesUnroll];
#pragma unroll
      for (int u = 0; u < kPlanesUnroll; ++u) {
        a[u] = -1;
        g[u] = A(0);
        plane[u] = at.c * pixels;
        if (at.r < found) {
          if constexpr (kMode == kDense) {
            const unsigned int offset =
                static_cast<unsigned int>(round_rois[at.r]) + at.c * bins + at.q;
            a[u] = __ldcs(argmax + offset);
            g[u] = static_cast<A>(Elem<T>::value_of(grad_output[offset]));
          } else {
            const i64 k = round_rois[at.r];
            const i64 c = c0 + at.c;
            a[u] = __ldcs(argmax + ((k * C + c) * bins + at.q));
            g[u] = static_cast<A>(
                Elem<T>::value_of(grad_output[k * gs0 + c * gs1 + bin_offset[at.q]]));
          }
        }
        at.advance();
      }
#pragma unroll
      for (int u = 0; u < kPlanesUnroll; ++u) {
        if (a[u] >= 0) atomicAdd(planes + plane[u] + a[u], g[u]);
      }
    }
  }
}

// One round of the planes kernel by the addressing that applies (add_round): dense with one
// channel a block, dense, or strided.
template <class A, int kBlock, class T>
__device__ __forceinline__ void planes_round(
    const bool dense, const unsigned int channels, const T* __restrict__ grad_output,
    const int* __restrict__ argmax, const int* __restrict__ round_rois, const unsigned int found,
    const OutputWalk& start, const i64 gs0, const i64 gs1, const i64 C,
    const i64* __restrict__ bin_offset, const i64 c0, A* __restrict__ planes,
    const unsigned int pixels) {
  if (dense && channels == 1) {
    add_round<A, kBlock, kDenseOne>(grad_output, argmax, round_rois, found, start, 0, 0, 0,
                                    nullptr, 0, planes, pixels);
  } else if (dense) {
    add_round<A, kBlock, kDense>(grad_output, argmax, round_rois, found, start, 0, 0, 0,
                                 nullptr, 0, planes, pixels);
  } else {
    add_round<A, kBlock, kStrided>(grad_output, argmax, round_rois, found, start, gs0, gs1, C,
                                   bin_offset, c0, planes, pixels);
  }
}

// Which planes a block sums: its image, its first channel c0 and its channel count, from its
// index among its N * ceil(C / channels_per_block) blocks (channel block fastest).
struct PlanesBlockAt {
  int image;  // N < 2^31
  i64 c0;
  unsigned int channels;
};
__device__ __forceinline__ PlanesBlockAt planes_block_at(const i64 block, const i64 C,
                                                          const i64 channels_per_block) {
  const i64 channel_blocks = (C + channels_per_block - 1) / channels_per_block;
  PlanesBlockAt at;
  at.image = static_cast<int>(block / channel_blocks);
  at.c0 = (block - at.image * channel_blocks) * channels_per_block;
  at.channels =
      static_cast<unsigned int>(C - at.c0 < channels_per_block ? C - at.c0 : channels_per_block);
  return at;
}

// The planes kernel's work in one block: the gradient planes of channels [c0, c0 + channels)
// of `image`, HW pixels each, written to grad_planes (channel and pixel strides gi_channel,
// gi_pixel), from the ROIs of that image: found among all K by their batch indices, or
// (kGrouped) the `group_size` ROIs listed at `group` (group_rois.cu).
template <class T, class R, int kBlock, bool kGrouped>
__device__ __forceinline__ void planes_block(
    const T* __restrict__ grad_output, const i64 gs0, const i64 gs1, const i64 gs2, const i64 gs3,
    const int* __restrict__ argmax, const R* __restrict__ rois, const i64 rs0, const i64 N,
    const i64 C, const i64 HW, const i64 PH, const i64 PW, const int image, const i64 c0,
    const unsigned int channels, T* __restrict__ const grad_planes, const i64 gi_channel,
    const i64 gi_pixel, const i64 K, const int* __restrict__ group, const int group_size) {
  typedef typename Accum<T>::type A;
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  i64* bin_offset = reinterpret_cast<i64*>(roi_dynamic_shared);  // grad_output offset of each bin
  A* planes = reinterpret_cast<A*>(bin_offset + bins);
  // Batch indices each thread checks per round: more ROIs per round, fewer rounds of waiting.
  constexpr int kScan = kBlock == 256 ? 4 : 1;
  constexpr int kRound = kScan * kBlock;
  __shared__ int round_rois[kRound];  // this image's ROIs of the round, in order (add_round)
  __shared__ int warp_counts[kScan][kBlock / 32];
  const unsigned int tid = threadIdx.x;
  const unsigned int lane = tid & 31u;
  const unsigned int warp = tid >> 5;
  const i64 plane_size = channels * HW;
  for (unsigned int q = tid; q < bins; q += kBlock) {
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    bin_offset[q] = ph * gs2 + (q - ph * static_cast<unsigned int>(PW)) * gs3;
  }
  for (i64 i = tid; i < plane_size; i += kBlock) planes[i] = A(0);
  // kDense addressing (add_round) where it applies.
  const bool dense = gs3 == 1 && gs2 == PW && gs1 == PH * PW && gs0 == C * gs1 &&
                     K * gs0 <= static_cast<i64>(0x7fffffff);
  const unsigned int pixels = static_cast<unsigned int>(HW);  // plane_size is below 2^31
  // This thread's first element of a round as (ROI of the round, channel, bin), and the block's
  // step (kBlock elements).
  const OutputWalk round_start(tid, kBlock, channels, bins);
  if constexpr (kGrouped) {
    for (int r0 = 0; r0 < group_size; r0 += kRound) {
      const unsigned int found =
          static_cast<unsigned int>(group_size - r0 < kRound ? group_size - r0 : kRound);
#pragma unroll
      for (int s = 0; s < kScan; ++s) {
        const unsigned int i = s * kBlock + tid;
        if (i < found) {
          const i64 k = group[r0 + i];
          round_rois[i] = static_cast<int>(dense ? (k * C + c0) * bins : k);
        }
      }
      __syncthreads();  // also orders the table and the zero fill (first round) before their use
      planes_round<A, kBlock>(dense, channels, grad_output, argmax, round_rois, found,
                              round_start, gs0, gs1, C, bin_offset, c0, planes, pixels);
      __syncthreads();  // before round_rois is overwritten
    }
    __syncthreads();  // the zero fill before the planes are written, when no round ran
  } else {
    // The image of ROI k (-1 beyond K): its batch index as int (in [0, N), N < 2^31), which
    // keeps the kernel within its register bound too.
    auto image_of = [&](i64 k) -> int { return k < K ? roi_image<R>(rois, rs0, k, N) : -1; };
    // The next round's batch indices, loaded a round ahead.
    int next_image[kScan];
#pragma unroll
    for (int s = 0; s < kScan; ++s) next_image[s] = image_of(s * kBlock + tid);
    for (i64 r0 = 0; r0 < K; r0 += kRound) {
      // This image's ROIs among the next kRound, in order, as rows [0, found) of round_rois.
      bool mine[kScan];
      unsigned int ballots[kScan];
#pragma unroll
      for (int s = 0; s < kScan; ++s) {
        mine[s] = next_image[s] == image;
        next_image[s] = image_of(r0 + kRound + s * kBlock + tid);
        ballots[s] = __ballot_sync(0xffffffffu, mine[s]);
        if (lane == 0) warp_counts[s][warp] = __popc(ballots[s]);
      }
      __syncthreads();  // also orders the table and the zero fill (first round) before their use
      unsigned int found = 0;
#pragma unroll
      for (int s = 0; s < kScan; ++s) {
        unsigned int offset = found;
#pragma unroll
        for (unsigned int w = 0; w < kBlock / 32; ++w) {
          offset += w < warp ? warp_counts[s][w] : 0;
          found += warp_counts[s][w];
        }
        if (mine[s]) {
          const unsigned int below = __popc(ballots[s] & ((1u << lane) - 1u));
          const i64 k = r0 + s * kBlock + tid;
          round_rois[offset + below] = static_cast<int>(dense ? (k * C + c0) * bins : k);
        }
      }
      __syncthreads();
      planes_round<A, kBlock>(dense, channels, grad_output, argmax, round_rois, found,
                              round_start, gs0, gs1, C, bin_offset, c0, planes, pixels);
      __syncthreads();  // before round_rois and warp_counts are overwritten
    }
  }
  // Pointer steps: index arithmetic per element measured slower.
  const i64 step = kBlock * gi_pixel;
#pragma unroll 1
  for (unsigned int c = 0; c < channels; ++c) {  // one channel per block by default
    const A* plane = planes + c * pixels;
    T* __restrict__ out = grad_planes + c * gi_channel + tid * gi_pixel;
    for (unsigned int i = tid; i < pixels; i += kBlock, out += step) {
      *out = Rounded<T>::of(plane[i]);
    }
  }
}
}  // namespace roi_ops_cuda

template <class T, class R, int kBlock>
__global__ void __launch_bounds__(kBlock, roi_ops_cuda::PlanesBlocksPerSM<T, kBlock>::value)
    roi_pool_backward_planes(const T* __restrict__ grad_output, const i64 gs0, const i64 gs1,
                             const i64 gs2, const i64 gs3, const int* __restrict__ argmax,
                             const R* __restrict__ rois, const i64 rs0, const i64 N,
                             const i64 C, const i64 HW, const i64 PH, const i64 PW,
                             const i64 channels_per_block, T* __restrict__ grad_input,
                             const i64 gi_image, const i64 gi_channel, const i64 gi_pixel,
                             const i64 K) {
  using namespace roi_ops_cuda;
  const PlanesBlockAt at = planes_block_at(blockIdx.x, C, channels_per_block);
  // This block's gradient planes, computed here: it keeps the kernel within its register bound.
  T* __restrict__ const grad_planes = grad_input + at.image * gi_image + at.c0 * gi_channel;
  planes_block<T, R, kBlock, false>(grad_output, gs0, gs1, gs2, gs3, argmax, rois, rs0, N, C, HW,
                                    PH, PW, at.image, at.c0, at.channels, grad_planes,
                                    gi_channel, gi_pixel, K, nullptr, 0);
}

// ---- roi_pool_backward_planes_grouped<T, kBlock>: the planes kernel reading its image's list ---
// roi_pool_backward_planes with each block reading its image's ROIs from the list that
// roi_ops_group_rois wrote in `groups` (one level: K + N + 1 int32, launched before on the same
// stream) instead of scanning all K batch indices: for problems where that scan is most of a
// block's work (planning.backward_kernel). Arguments as roi_pool_backward_planes' with groups
// in place of the rois and rs0.
template <class T, int kBlock>
__global__ void __launch_bounds__(kBlock, roi_ops_cuda::PlanesBlocksPerSM<T, kBlock>::value)
    roi_pool_backward_planes_grouped(const T* __restrict__ grad_output, const i64 gs0,
                                     const i64 gs1, const i64 gs2, const i64 gs3,
                                     const int* __restrict__ argmax,
                                     const int* __restrict__ groups, const i64 N, const i64 C,
                                     const i64 HW, const i64 PH, const i64 PW,
                                     const i64 channels_per_block, T* __restrict__ grad_input,
                                     const i64 gi_image, const i64 gi_channel,
                                     const i64 gi_pixel, const i64 K) {
  using namespace roi_ops_cuda;
  const PlanesBlockAt at = planes_block_at(blockIdx.x, C, channels_per_block);
  T* __restrict__ const grad_planes = grad_input + at.image * gi_image + at.c0 * gi_channel;
  const int* const first = groups + K;  // each image's first position (group_rois.cu)
  const int begin = first[at.image];
  // The rois type is unused where the ROIs come listed.
  planes_block<T, float, kBlock, true>(grad_output, gs0, gs1, gs2, gs3, argmax, nullptr, 0, N,
                                       C, HW, PH, PW, at.image, at.c0, at.channels, grad_planes,
                                       gi_channel, gi_pixel, K, groups + begin,
                                       first[at.image + 1] - begin);
}

// ---- roi_pool_backward_planes_levels<T, R, kBlock>: the planes backward over pyramid levels ---
// Each level has its own run of blocks (levels.cuh: LevelPlanes, in any order; each level's
// channels_per_block sized so that its planes fill about the same shared memory): a block sums
// the gradients of its image's ROIs of its level, listed by roi_ops_group_rois in `groups`
// (K + L * N + 1 int32, launched before on the same stream). Every element of every level's
// gradient is written. Arguments: the L levels' planes, L, groups, then as the planes kernel's
// without the rois, HW, channels_per_block and the gradient's. Grid: the blocks of all levels;
// dynamic shared memory PH * PW * 8 + the largest level's planes.
template <class T, class R, int kBlock>
__global__ void __launch_bounds__(kBlock, roi_ops_cuda::PlanesBlocksPerSM<T, kBlock, true>::value)
    roi_pool_backward_planes_levels(const roi_ops_cuda::LevelPlanes<T> planes, const i64 L,
                                    const int* __restrict__ groups,
                                    const T* __restrict__ grad_output, const i64 gs0,
                                    const i64 gs1, const i64 gs2, const i64 gs3,
                                    const int* __restrict__ argmax, const i64 N, const i64 C,
                                    const i64 PH, const i64 PW, const i64 K) {
  using namespace roi_ops_cuda;
  int level = 0;  // the level whose blocks start last at or before this one
  i64 start = -1;
  for (int l = 0; l < L; ++l) {
    const i64 first = planes.level[l].first_block;
    if (first <= static_cast<i64>(blockIdx.x) && first > start) {
      start = first;
      level = l;
    }
  }
  const LevelPlane<T>& plane = planes.level[level];
  const PlanesBlockAt at =
      planes_block_at(blockIdx.x - plane.first_block, C, plane.channels_per_block);
  T* __restrict__ const grad_planes =
      plane.grad_input + at.image * plane.gi_image + at.c0 * plane.gi_channel;
  const int* const first = groups + K;  // each group's first position (group_rois.cu)
  const i64 group = level * N + at.image;
  const int begin = first[group];
  planes_block<T, R, kBlock, true>(grad_output, gs0, gs1, gs2, gs3, argmax, nullptr, 0, N, C,
                                   plane.HW, PH, PW, at.image, at.c0, at.channels, grad_planes,
                                   plane.gi_channel, plane.gi_pixel, K, groups + begin,
                                   first[group + 1] - begin);
}
