// ---- roi_pool_forward_strip<T, R, kArgmax>: a unit W stride, rows reduced first ----
// A block pools one ROI for a block of channels in two passes through shared memory. Pass 1:
// each thread takes one column strip (kVec adjacent columns of the ROI's window, one 16-byte
// load where the rows allow it) of one channel and walks down its rows, keeping the maximum of
// every column over each bin row's rows (and, with the argmax, its first row); a warp's loads
// read adjacent columns of one image row, and every thread of the block runs the same rows.
// Pass 2: each thread takes one bin for some channels, reduces its columns' maxima from shared
// memory and stores the results; adjacent threads store adjacent outputs. Channels go through in
// chunks whose column maxima fit the block's `column_bytes` of shared memory.
// Without an argmax the passes reduce with max.NaN and a zero or NaN result is replaced by the
// bin's first element of that key (as the unit kernel does); with one, a bin's result is the
// column maximum that is largest, then in the earliest row, then the earliest column: the first
// maximal element in row-major order (NaN rules in `replaces`).
namespace roi_ops_cuda {
constexpr int kStripBlocksPerSM = 4;

// Columns per load where the rows allow vectors: 16 bytes, but 8 for 16-bit elements with the
// argmax (eight maxima and rows at once spill registers).
template <class T, bool kArgmax>
__host__ __device__ constexpr int strip_vector() {
  return kArgmax && sizeof(T) == 2 ? 4 : 16 / static_cast<int>(sizeof(T));
}

// Pass 1 of one column strip of kVec columns: the maxima over each bin row's rows into
// columns[ph * row_length + e] (e < kVec), and with the argmax their first rows into rows[...].
template <class T, int kVec, bool kArgmax>
struct StripColumns;

// Inference, kVec 1: NaNMax on single elements.
template <class T>
struct StripColumns<T, 1, false> {
  typedef typename NaNMax<T>::V V;
  static __device__ __forceinline__ void run(const T* __restrict__ column, i64 sH,
                                             const int2* __restrict__ edges, int PH,
                                             int row_length, V* __restrict__ columns,
                                             int* __restrict__) {
    for (int ph = 0; ph < PH; ++ph) {
      const int2 span = edges[ph];
      V m = NaNMax<T>::lowest();
      const T* __restrict__ p = column + span.x * sH;
#pragma unroll 4
      for (int y = span.x; y < span.y; ++y) {
        m = NaNMax<T>::max(m, NaNMax<T>::load(p));
        p += sH;
      }
      columns[ph * row_length] = m;
    }
  }
};

// Inference, one 16-byte vector: max.NaN on its four 32-bit words (PackedMax, forward_cvec.cu).
template <class T, int kVec>
struct StripColumns<T, kVec, false> {
  typedef typename NaNMax<T>::V V;
  static __device__ __forceinline__ void run(const T* __restrict__ column, i64 sH,
                                             const int2* __restrict__ edges, int PH,
                                             int row_length, V* __restrict__ columns,
                                             int* __restrict__) {
    for (int ph = 0; ph < PH; ++ph) {
      const int2 span = edges[ph];
      unsigned int m[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) m[i] = PackedMax<T>::lowest();
      const T* __restrict__ p = column + span.x * sH;
#pragma unroll 2
      for (int y = span.x; y < span.y; ++y) {
        const roi_vec16 v = load_vec16(p);
#pragma unroll
        for (int i = 0; i < 4; ++i) m[i] = PackedMax<T>::max(m[i], v.w[i]);
        p += sH;
      }
      roi_vec16 out;
#pragma unroll
      for (int i = 0; i < 4; ++i) out.w[i] = m[i];
      *reinterpret_cast<roi_vec16*>(columns + ph * row_length) = out;
    }
  }
};

// With the argmax: compare and select per element, kVec elements from one load when kVec > 1.
template <class T, int kVec>
struct StripColumns<T, kVec, true> {
  typedef typename Work<T>::V V;
  // Element e of the kVec at p: one 16-byte (or 8-byte) load when kVec > 1, converted element
  // by element (16-bit elements stay packed until compared).
  struct Line {
    roi_vec16 words;
    T single;
    __device__ __forceinline__ explicit Line(const T* __restrict__ p) {
      if constexpr (kVec == 1) {
        single = *p;
      } else if constexpr (kVec * sizeof(T) == 8) {
        const unsigned long long pair = *reinterpret_cast<const unsigned long long*>(p);
        words.w[0] = static_cast<unsigned int>(pair);
        words.w[1] = static_cast<unsigned int>(pair >> 32);
      } else {
        words = load_vec16(p);
      }
    }
    __device__ __forceinline__ V operator[](int e) const {
      if constexpr (kVec == 1) {
        return Work<T>::in(single);
      } else {
        return Work<T>::in(reinterpret_cast<const T*>(&words)[e]);
      }
    }
  };
  static __device__ __forceinline__ void run(const T* __restrict__ column, i64 sH,
                                             const int2* __restrict__ edges, int PH,
                                             int row_length, V* __restrict__ columns,
                                             int* __restrict__ rows) {
    for (int ph = 0; ph < PH; ++ph) {
      const int2 span = edges[ph];
      V best[kVec];
      int at[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        best[e] = Work<T>::lowest();  // replaced by anything but -inf, which keeps row span.x
        at[e] = span.x;
      }
      const T* __restrict__ p = column + span.x * sH;
      for (int y = span.x; y < span.y; ++y) {
        const Line line(p);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const V v = line[e];
          if (replaces(v, best[e])) {
            best[e] = v;
            at[e] = y;
          }
        }
        p += sH;
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        columns[ph * row_length + e] = best[e];
        rows[ph * row_length + e] = at[e];
      }
    }
  }
};

// Whether column maximum v (first at row y) comes before best (first at row best_y) in the
// bin's row-major order of first maximal elements: larger, or equal (both NaN, or == with -0 ==
// +0) and in an earlier row. Columns are visited left to right, so a tie in the row keeps best.
template <class V>
__device__ __forceinline__ bool strip_precedes(V v, int y, V best, int best_y) {
  const bool v_nan = !(v == v), best_nan = !(best == best);
  if (replaces(v, best)) return true;
  const bool same = (v_nan && best_nan) || (v == best);
  return same && y < best_y;
}

// The block's work on ROI k of one map; arguments as unit_roi's, plus the shared memory given
// to column maxima (`column_bytes`, 16-byte aligned after the geometry and edges).
template <class T, class R, bool kArgmax, int kVec>
__device__ __forceinline__ void strip_roi(const T* __restrict__ input, const i64 num_images,
                                          const i64 C, const i64 H, const i64 W, const i64 sN,
                                          const i64 sC, const i64 sH, const R* __restrict__ row,
                                          const i64 rs1, const double spatial_scale,
                                          const i64 PH, const i64 PW,
                                          const i64 channels_per_block, const i64 column_bytes,
                                          T* __restrict__ output, int* __restrict__ argmax,
                                          const i64 k) {
  // float64 (no max.NaN) reduces by compare and select also without an argmax.
  constexpr bool kCompare = kArgmax || !NaNMax<T>::kEnabled;
  typedef StripColumns<T, kVec, kCompare> Pass1;
  typedef typename Pass1::V V;
  const int2* const edges = unit_geometry<R>(row, rs1, num_images, spatial_scale, PH, PW, H, W);
  const UnitGeometry* const shared = reinterpret_cast<const UnitGeometry*>(roi_dynamic_shared);
  const i64 batch = shared->batch;
  const i64 image = (batch >= 0 ? batch : 0) * sN;
  const int ph_count = static_cast<int>(PH), pw_count = static_cast<int>(PW);
  const int bins = ph_count * pw_count;
  // The window's columns [x0, x1), widened to whole vectors from xa (bins are monotone).
  const int x0 = edges[ph_count].x, x1 = edges[ph_count + pw_count - 1].y;
  const int xa = x0 / kVec * kVec;
  const int strips = x1 > x0 ? (x1 - xa + kVec - 1) / kVec : 0;
  const int row_length = strips * kVec;
  // Shared memory after the geometry and edges, 16-byte aligned: column maxima, then rows.
  const int edge_bytes = static_cast<int>(sizeof(UnitGeometry)) + 8 * (ph_count + pw_count);
  unsigned char* const base = roi_dynamic_shared + ((edge_bytes + 15) & ~15);
  const int entry_bytes = static_cast<int>(sizeof(V)) + (kCompare ? 4 : 0);
  const int per_channel = ph_count * row_length * entry_bytes;
  const int chunk_channels_limit =
      per_channel > 0 ? static_cast<int>(column_bytes / per_channel) : 1 << 30;
  V* const columns = reinterpret_cast<V*>(base);
  const int w_int = static_cast<int>(W);  // H * W < 2^31 (checked by roi_ops)
  const int tid = static_cast<int>(threadIdx.x), threads = static_cast<int>(blockDim.x);
  // Pass 2's threads: groups of `bins` threads, a bin each, taking every groups-th channel
  // (one group looping over the bins when there are more bins than threads).
  const bool few_bins = bins <= threads;
  const int groups = few_bins ? threads / bins : 1;
  const int q_first = few_bins ? tid % bins : tid;
  const int c_first = !few_bins ? 0 : tid < groups * bins ? tid / bins : 1 << 30;  // idle
  for (i64 c0 = blockIdx.y * channels_per_block; c0 < C; c0 += gridDim.y * channels_per_block) {
    const int block_channels =
        static_cast<int>(C - c0 < channels_per_block ? C - c0 : channels_per_block);
    for (int cc = 0; cc < block_channels; cc += chunk_channels_limit) {
      const int chunk = block_channels - cc < chunk_channels_limit ? block_channels - cc
                                                                   : chunk_channels_limit;
      const i64 first_channel = c0 + cc;
      int* const rows = reinterpret_cast<int*>(columns + chunk * ph_count * row_length);
      // Pass 1: one column strip of one channel per thread.
      const int items = chunk * strips;
      for (int it = tid; it < items; it += threads) {
        const int c = it / strips, j = it - c * strips;
        const T* __restrict__ column = input + image + (first_channel + c) * sC + xa + j * kVec;
        const int at = c * ph_count * row_length + j * kVec;
        Pass1::run(column, sH, edges, ph_count, row_length, columns + at, rows + at);
      }
      __syncthreads();
      // Pass 2: one bin of one channel per thread, in output order.
      T* __restrict__ out = output + (k * C + first_channel) * bins;
      int* __restrict__ arg = kArgmax ? argmax + (k * C + first_channel) * bins : nullptr;
      for (int q = q_first; q < bins; q += threads) {
        const int ph = q / pw_count, pw = q - ph * pw_count;
        const int2 span_h = edges[ph], span_w = edges[ph_count + pw];
        const bool empty = span_h.y <= span_h.x || span_w.y <= span_w.x;
        for (int c = c_first; c < chunk; c += groups) {
          const int line = (c * ph_count + ph) * row_length - xa;
          const T* __restrict__ plane = input + image + (first_channel + c) * sC;
          if constexpr (kCompare) {
            V best = Work<T>::lowest();
            int best_y = span_h.x, best_x = span_w.x;
            if (!empty) {
              best = columns[line + span_w.x];
              best_y = rows[line + span_w.x];
              for (int x = span_w.x + 1; x < span_w.y; ++x) {
                const V v = columns[line + x];
                const int y = rows[line + x];
                if (strip_precedes(v, y, best, best_y)) {
                  best = v;
                  best_y = y;
                  best_x = x;
                }
              }
            }
            T value = Work<T>::out(empty ? V(0) : best);
            if (!Work<T>::kKeepsNaN && !(best == best)) value = plane[best_y * sH + best_x];
            store_result<T>(out + c * bins + q, value);
            if constexpr (kArgmax) {
              store_result<int>(arg + c * bins + q, empty ? -1 : best_y * w_int + best_x);
            }
          } else {
            V m = NaNMax<T>::lowest();
            for (int x = span_w.x; x < span_w.y; ++x) m = NaNMax<T>::max(m, columns[line + x]);
            T value = NaNMax<T>::bits(empty ? V(0) : m);
            if (!empty && !NaNMax<T>::exact(m)) {
              value = first_with_key<T>(plane + span_h.x * sH + span_w.x, span_h.y - span_h.x,
                                        span_w.y - span_w.x, sH, 1, Elem<T>::key_of(value));
            }
            store_result<T>(out + c * bins + q, value);
          }
        }
      }
      __syncthreads();
    }
  }
}
}  // namespace roi_ops_cuda

// Arguments as the unit kernel's, plus `column_bytes` (the launch plan's shared memory for
// column maxima) and `vector` (1: kVec 16 / sizeof(T), the rows and planes 16-byte aligned with
// W a multiple of it; 0: one column per thread).
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kStripBlocksPerSM)
    roi_pool_forward_strip(ROI_OPS_MAP_PARAMETERS, const i64 channels_per_block,
                           const i64 column_bytes, const i64 vector, ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  (void)sW;  // 1: the launch plan picks this kernel only for a unit W stride
  const i64 k = blockIdx.x;
  if (vector != 0) {
    strip_roi<T, R, kArgmax, strip_vector<T, kArgmax>()>(
        input, N, C, H, W, sN, sC, sH, rois + k * rs0, rs1, spatial_scale, PH, PW,
        channels_per_block, column_bytes, output, argmax, k);
  } else {
    strip_roi<T, R, kArgmax, 1>(input, N, C, H, W, sN, sC, sH, rois + k * rs0, rs1,
                                spatial_scale, PH, PW, channels_per_block, column_bytes, output,
                                argmax, k);
  }
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}

// ---- roi_pool_forward_strip_levels<T, R, kArgmax>: the strip kernel over pyramid levels ------
// Block (k, channel blocks) pools ROI k from the map of its level (common.cuh: LevelMaps); a ROI
// with no level pools nothing. Every level has a unit W stride, and `vector` holds for all.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kStripBlocksPerSM)
    roi_pool_forward_strip_levels(ROI_OPS_LEVELS_PARAMETERS, const i64 channels_per_block,
                                  const i64 column_bytes, const i64 vector,
                                  ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  const i64 k = blockIdx.x;
  const int level = roi_level(levels, ls0, k, L);
  const LevelMap<T>& map = maps.level[level < 0 ? 0 : level];
  const i64 images = level < 0 ? 0 : N;
  if (vector != 0) {
    strip_roi<T, R, kArgmax, strip_vector<T, kArgmax>()>(
        map.input, images, C, map.H, map.W, map.sN, map.sC, map.sH, rois + k * rs0, rs1,
        map.spatial_scale, PH, PW, channels_per_block, column_bytes, output, argmax, k);
  } else {
    strip_roi<T, R, kArgmax, 1>(map.input, images, C, map.H, map.W, map.sN, map.sC, map.sH,
                                rois + k * rs0, rs1, map.spatial_scale, PH, PW,
                                channels_per_block, column_bytes, output, argmax, k);
  }
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}
