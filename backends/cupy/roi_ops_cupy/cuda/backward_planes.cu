// ---- roi_pool_backward_planes<T, R, kBlock>: gradient planes summed in shared memory --------
// The backward without global atomics or zero fill. One block per (image, channel block) keeps
// the block's gradient planes (channels_per_block * HW accumulators, float32 for the 16-bit
// types) in dynamic shared memory, finds its image's ROIs 1024 at a time (four per thread in
// 256-thread blocks; in order, by block-wide ballots; the next round's batch indices load while
// this round's gradients are added), adds their gradients there with shared-memory atomics and
// writes the planes out once, rounded: grad_input needs no zero fill and no conversion pass.
// kBlock is 256, or 1024 for planes so large that one block fills an SM's shared memory (enough
// loads in flight). Each thread walks its elements (ROI of the round, channel, bin) in steps of
// the block with a mixed-radix counter, so the inner loop has no division; the bins'
// grad_output offsets sit in a table. Grid: N * ceil(C / channels_per_block) blocks, channel
// block fastest; kBlock threads; dynamic shared memory PH * PW * 8 + channels_per_block * HW *
// sizeof(accumulator) bytes. grad_input (N, C, H, W) of T, contiguous or channels_last.
// Requires channels_per_block * PH * PW * kBlock < 2^31 and K < 2^31. Not run-to-run
// deterministic (the order of the shared-memory additions varies).
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
// 64-bit addresses and sums need more than 48 registers on sm_80), or 1 of 1024.
template <class T, int kBlock>
struct PlanesBlocksPerSM {
  static constexpr int value = kBlock == 256 ? (sizeof(T) == 8 ? 4 : 5) : 1;
};
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
  typedef typename Accum<T>::type A;
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  i64* bin_offset = reinterpret_cast<i64*>(roi_dynamic_shared);  // grad_output offset of each bin
  A* planes = reinterpret_cast<A*>(bin_offset + bins);
  // Batch indices each thread checks per round: more ROIs per round, fewer rounds of waiting.
  constexpr int kScan = kBlock == 256 ? 4 : 1;
  constexpr int kRound = kScan * kBlock;
  __shared__ int round_rois[kRound];  // this image's ROIs of the round, in order
  __shared__ int warp_counts[kScan][kBlock / 32];
  const unsigned int tid = threadIdx.x;
  const unsigned int lane = tid & 31u;
  const unsigned int warp = tid >> 5;
  const i64 channel_blocks = (C + channels_per_block - 1) / channels_per_block;
  const int image = static_cast<int>(blockIdx.x / channel_blocks);  // N < 2^31
  const i64 c0 = (blockIdx.x - image * channel_blocks) * channels_per_block;
  // This block's gradient planes, computed here: it keeps the kernel within its register bound.
  T* __restrict__ const grad_planes = grad_input + image * gi_image + c0 * gi_channel;
  const unsigned int channels =
      static_cast<unsigned int>(C - c0 < channels_per_block ? C - c0 : channels_per_block);
  const i64 plane_size = channels * HW;
  for (unsigned int q = tid; q < bins; q += kBlock) {
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    bin_offset[q] = ph * gs2 + (q - ph * static_cast<unsigned int>(PW)) * gs3;
  }
  for (i64 i = tid; i < plane_size; i += kBlock) planes[i] = A(0);
  const unsigned int per_roi = channels * bins;
  // This thread's first element of a round as (ROI of the round, channel, bin), and the block's
  // step (kBlock elements).
  const OutputWalk round_start(tid, kBlock, channels, bins);
  // The next round's batch indices, loaded a round ahead; as int (each is in [0, N) and
  // N < 2^31), which keeps the kernel within its register bound too.
  int next_image[kScan];
#pragma unroll
  for (int s = 0; s < kScan; ++s) {
    const i64 k = s * kBlock + tid;
    next_image[s] = k < K ? roi_image<R>(rois, rs0, k, N) : -1;
  }
  for (i64 r0 = 0; r0 < K; r0 += kRound) {
    // This image's ROIs among the next kRound, in order, as rows [0, found) of round_rois.
    bool mine[kScan];
    unsigned int ballots[kScan];
#pragma unroll
    for (int s = 0; s < kScan; ++s) {
      mine[s] = next_image[s] == image;
      const i64 k_next = r0 + kRound + s * kBlock + tid;
      next_image[s] = k_next < K ? roi_image<R>(rois, rs0, k_next, N) : -1;
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
        round_rois[offset + below] = static_cast<int>(r0 + s * kBlock + tid);
      }
    }
    __syncthreads();
    OutputWalk at = round_start;
    for (unsigned int e0 = tid; e0 < found * per_roi; e0 += kPlanesUnroll * kBlock) {
      int a[kPlanesUnroll];
      A g[kPlanesUnroll];
      unsigned int plane[kPlanesUnroll];
#pragma unroll
      for (int u = 0; u < kPlanesUnroll; ++u) {
        a[u] = -1;
        g[u] = A(0);
        plane[u] = at.c;
        if (at.r < found) {
          const i64 k = round_rois[at.r];
          a[u] = __ldcs(argmax + ((k * C + c0 + at.c) * bins + at.q));  // read once: evict first
          g[u] = static_cast<A>(Elem<T>::value_of(
              grad_output[k * gs0 + (c0 + at.c) * gs1 + bin_offset[at.q]]));
        }
        at.advance();
      }
#pragma unroll
      for (int u = 0; u < kPlanesUnroll; ++u) {
        if (a[u] >= 0) atomicAdd(planes + plane[u] * HW + a[u], g[u]);
      }
    }
    __syncthreads();  // before round_rois and warp_counts are overwritten
  }
  // Pointer steps: index arithmetic per element measured slower.
  const unsigned int pixels = static_cast<unsigned int>(HW);  // plane_size is below 2^31
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

