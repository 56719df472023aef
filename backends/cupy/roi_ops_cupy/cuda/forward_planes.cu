// ---- roi_pool_forward_planes<T, R, kArgmax>: planes staged once, every ROI of their image ----
// For many overlapping ROIs on small maps. The unit kernel fetches each (ROI, channel) window
// from L2 on its own, in 32-byte sectors of short rows: the L2 reads add up to many times the
// input. Here one block per (image, channel block) copies its planes into shared memory once and
// pools every ROI of its image from there. It finds the image's ROIs kForwardRound at a time as
// the planes backward does (block-wide ballots, in order), computes each found ROI's geometry
// once into a table, then each thread takes (ROI of the round, bin) pairs, consecutive threads
// on consecutive bins (coalesced stores), and reduces that bin in every channel of the block.
// A ROI belongs to the image roi_image() names (an invalid ROI to its clamped batch index,
// where its geometry pools nothing: zeros, argmax -1; channel block 0 records it in the log).
// Grid: N * ceil(C / channels_per_block), channel block fastest; kThreads threads; dynamic
// shared memory channels_per_block * H * W * sizeof(T). H * W < 2^31. Arguments as the unit
// kernel's, then K.
namespace roi_ops_cuda {
constexpr int kForwardScan = 2;  // batch indices each thread checks per round
constexpr int kForwardRound = kForwardScan * kThreads;

constexpr int kPlanesChannels = 4;  // channels reduced together (independent loads in flight)

// The first maximal element of a bin of `channels` planes in shared memory (HW elements apart,
// rows W apart), each stored at out + c * out_step (argmax likewise); NaN rules in `replaces`.
// Channels go kPlanesChannels at a time; past the last channel a step re-reads the last one and
// stores nothing.
template <class T, bool kArgmax>
__device__ __forceinline__ void planes_bin(const T* plane, unsigned int channels, unsigned int HW,
                                           int W, int bin_h, int bin_w, int first_index,
                                           T* __restrict__ out, int* __restrict__ arg,
                                           i64 out_step) {
  typedef typename Work<T>::V V;
  constexpr int U = kPlanesChannels;
  const bool empty = bin_h <= 0 || bin_w <= 0;
  for (unsigned int c = 0; c < channels; c += U) {
    const T* p[U];
    V best[U];
    int at[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      p[u] = plane + (c + u < channels ? c + u : channels - 1) * HW;
      best[u] = Work<T>::lowest();  // the first element replaces it unless it is -inf itself
      at[u] = 0;
    }
    if (!empty) {
      for (int i = 0; i < bin_h; ++i) {
        for (int j = 0; j < bin_w; ++j) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const V v = Work<T>::in(p[u][i * W + j]);
            if (replaces(v, best[u])) {
              best[u] = v;
              at[u] = i * W + j;
            }
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c + u < channels) {
        T value = Work<T>::out(empty ? V(0) : best[u]);
        if (!Work<T>::kKeepsNaN && !(best[u] == best[u])) {  // the NaN's payload was lost
          value = first_with_key<T>(p[u], bin_h, bin_w, W, 1, Elem<T>::key_of(value));
        }
        store_result<T>(out + (c + u) * out_step, value);
        if (kArgmax) store_result<int>(arg + (c + u) * out_step, empty ? -1 : first_index + at[u]);
      }
    }
  }
}

// The same without an argmax: one max.NaN per element (NaNMax; zeros and NaNs fixed up from the
// bin's first element with the same key, as in the unit kernel).
template <class T>
__device__ __forceinline__ void planes_bin_max(const T* plane, unsigned int channels,
                                               unsigned int HW, int W, int bin_h, int bin_w,
                                               T* __restrict__ out, i64 out_step) {
  typedef typename NaNMax<T>::V V;
  constexpr int U = kPlanesChannels;
  const bool empty = bin_h <= 0 || bin_w <= 0;
  for (unsigned int c = 0; c < channels; c += U) {
    const T* p[U];
    V m[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      p[u] = plane + (c + u < channels ? c + u : channels - 1) * HW;
      m[u] = NaNMax<T>::lowest();
    }
    if (!empty) {
      for (int i = 0; i < bin_h; ++i) {
        for (int j = 0; j < bin_w; ++j) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if constexpr (sizeof(T) == 2) {
              m[u] = NaNMax<T>::max(m[u], p[u][i * W + j].bits);
            } else {
              m[u] = NaNMax<T>::max(m[u], p[u][i * W + j]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c + u < channels) {
        T value = NaNMax<T>::bits(empty ? V(0) : m[u]);
        if (!empty && !NaNMax<T>::exact(m[u])) {
          value = first_with_key<T>(p[u], bin_h, bin_w, W, 1, Elem<T>::key_of(value));
        }
        store_result<T>(out + (c + u) * out_step, value);
      }
    }
  }
}
}  // namespace roi_ops_cuda

template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, 2)
    roi_pool_forward_planes(ROI_OPS_MAP_PARAMETERS, const i64 channels_per_block, const i64 K,
                            ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  typedef typename Rois<R>::G G;
  __shared__ RoiGeometry<G> round_geometry[kForwardRound];  // this image's ROIs of the round
  __shared__ int round_rois[kForwardRound];
  __shared__ int warp_counts[kForwardScan][kThreads / 32];
  T* const planes = reinterpret_cast<T*>(roi_dynamic_shared);
  const i64 channel_blocks = (C + channels_per_block - 1) / channels_per_block;
  const int image = static_cast<int>(blockIdx.x / channel_blocks);  // N < 2^31
  const i64 c0 = (blockIdx.x - image * channel_blocks) * channels_per_block;
  const unsigned int channels =
      static_cast<unsigned int>(C - c0 < channels_per_block ? C - c0 : channels_per_block);
  const unsigned int tid = threadIdx.x;
  const unsigned int lane = tid & 31u;
  const unsigned int warp = tid >> 5;
  const int w_int = static_cast<int>(W);
  const unsigned int HW = static_cast<unsigned int>(H * W);
  // The planes, one row per warp at a time (one division per row).
  const T* __restrict__ source = input + image * sN + c0 * sC;
  const unsigned int rows = channels * static_cast<unsigned int>(H);
  for (unsigned int row = warp; row < rows; row += kThreads / 32) {
    const unsigned int c = row / static_cast<unsigned int>(H);
    const unsigned int h = row - c * static_cast<unsigned int>(H);
    const T* __restrict__ line = source + c * sC + h * sH;
    T* const staged = planes + row * static_cast<unsigned int>(W);
    for (unsigned int w = lane; w < static_cast<unsigned int>(W); w += 32) staged[w] = line[w * sW];
  }
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  const unsigned int pw_count = static_cast<unsigned int>(PW);
  int next_image[kForwardScan];
#pragma unroll
  for (int s = 0; s < kForwardScan; ++s) {
    const i64 k = s * kThreads + tid;
    next_image[s] = k < K ? roi_image<R>(rois, rs0, k, N) : -1;
  }
  for (i64 r0 = 0; r0 < K; r0 += kForwardRound) {
    // This image's ROIs among the next kForwardRound, in order, as rows [0, found).
    bool mine[kForwardScan];
    unsigned int ballots[kForwardScan];
#pragma unroll
    for (int s = 0; s < kForwardScan; ++s) {
      mine[s] = next_image[s] == image;
      const i64 k = r0 + kForwardRound + s * kThreads + tid;
      next_image[s] = k < K ? roi_image<R>(rois, rs0, k, N) : -1;
      ballots[s] = __ballot_sync(0xffffffffu, mine[s]);
      if (lane == 0) warp_counts[s][warp] = __popc(ballots[s]);
    }
    __syncthreads();  // also orders the staged planes (first round) before their use
    unsigned int found = 0;
#pragma unroll
    for (int s = 0; s < kForwardScan; ++s) {
      unsigned int offset = found;
#pragma unroll
      for (unsigned int w = 0; w < kThreads / 32; ++w) {
        offset += w < warp ? warp_counts[s][w] : 0;
        found += warp_counts[s][w];
      }
      if (mine[s]) {
        const unsigned int r = offset + __popc(ballots[s] & ((1u << lane) - 1u));
        const i64 k = r0 + s * kThreads + tid;
        const R* __restrict__ row = rois + k * rs0;
        round_rois[r] = static_cast<int>(k);
        round_geometry[r] = roi_geometry<R>(row, rs1, N, spatial_scale, PH, PW);
        if (round_geometry[r].batch < 0 && c0 == 0 && bad_roi_log != nullptr) {
          record_bad_row<R>(bad_roi_log, row, rs1, k, N);
        }
      }
    }
    __syncthreads();
    for (unsigned int e = tid; e < found * bins; e += kThreads) {
      const unsigned int r = e / bins;
      const unsigned int q = e - r * bins;
      const unsigned int ph = q / pw_count;
      const RoiGeometry<G> g = round_geometry[r];
      const bool valid = g.batch >= 0;
      const int2 span_h = bin_span<G>(ph, g.bin_h, g.y1, H, valid);
      const int2 span_w = bin_span<G>(q - ph * pw_count, g.bin_w, g.x1, W, valid);
      const int first_index = span_h.x * w_int + span_w.x;
      const i64 first_output = (round_rois[r] * C + c0) * bins + q;
      const int bin_h = span_h.y - span_h.x;
      const int bin_w = span_w.y - span_w.x;
      if constexpr (!kArgmax && NaNMax<T>::kEnabled) {
        planes_bin_max<T>(planes + first_index, channels, HW, w_int, bin_h, bin_w,
                          output + first_output, bins);
      } else {
        planes_bin<T, kArgmax>(planes + first_index, channels, HW, w_int, bin_h, bin_w,
                               first_index, output + first_output,
                               kArgmax ? argmax + first_output : nullptr, bins);
      }
    }
    __syncthreads();  // before the round's tables are overwritten
  }
}
