// ---- roi_pool_forward_small<T, R, kArgmax>: many ROIs with few outputs each -----------------
// For a unit W stride (NCHW contiguous and the like) when each ROI has few outputs (C * PH * PW:
// e.g. 64 channels of 3 x 3 bins), where the unit kernel's blocks (one ROI each) would be mostly
// overhead: each thread would compute the ROI's geometry for two or three outputs, with half the
// warps in flight that small registers allow. Here a block covers `rois_per_block` consecutive
// ROIs, whose outputs are contiguous in memory. Its threads first compute each (ROI, bin)'s
// span once into a shared-memory table (and record invalid ROIs in the bad-ROI log), then walk
// the block's outputs in steps of the block, consecutive threads on consecutive outputs
// (coalesced stores), one channel of one bin each, with the unit kernel's reduction
// (forward_unit.cu: compare and select, or max.NaN without argmax). Few registers, so many
// warps are in flight to hide the loads' latency.
//
// Arguments as the unit kernel's, with rois_per_block and K for channels_per_block. Grid
// (ceil(K / rois_per_block)); blocks of kThreads; dynamic shared memory
// rois_per_block * PH * PW * sizeof(SmallBin) bytes. rois_per_block * C * PH * PW < 2^31.
namespace roi_ops_cuda {
// 32 registers (eight blocks of 256 threads per SM: every warp slot filled); float64's 64-bit
// values and offsets need 40 (six blocks).
template <class T>
struct SmallBlocksPerSM {
  static constexpr int value = sizeof(T) == 8 ? 6 : 8;
};

// The multi-level kernel's bounds: each output's level strides take registers that the
// single-level kernel reads from its parameters; 32 (float64: 40) registers would spill.
template <class T>
struct SmallLevelsBlocksPerSM {
  static constexpr int value = sizeof(T) == 8 ? 5 : 6;
};

// One (ROI, bin) of a block: where the bin starts in channel 0 of its image (an offset from
// the input; in the multi-level kernels its address), its size (empty when either is 0), its
// first element's argmax (h * W + w), and the level whose map it reads (0 in the single-level
// kernels).
struct SmallBin {
  i64 corner;
  int bin_h, bin_w;
  int first_index;
  int level;
};

// Bin (ph, pw) of a ROI of geometry g on a map of H x W with strides sN, sH, sW (level 0).
template <class G>
__device__ __forceinline__ SmallBin small_bin(const RoiGeometry<G>& g, unsigned int ph,
                                              unsigned int pw, i64 H, i64 W, i64 sN, i64 sH,
                                              i64 sW) {
  const bool valid = g.batch >= 0;
  const int2 rows = bin_span<G>(ph, g.bin_h, g.y1, H, valid);
  const int2 cols = bin_span<G>(pw, g.bin_w, g.x1, W, valid);
  SmallBin bin;
  bin.corner = (valid ? g.batch : 0) * sN + rows.x * sH + cols.x * sW;
  bin.bin_h = rows.y - rows.x;
  bin.bin_w = cols.y - cols.x;
  bin.first_index = rows.x * static_cast<int>(W) + cols.x;  // H * W < 2^31 (checked by roi_ops)
  bin.level = 0;
  return bin;
}

// Fills table[r * PH * PW + q] for the block's `count` ROIs from `first_roi` (all threads of
// the block; a barrier follows) and records the invalid ones in the bad-ROI log (null: none).
template <class R>
__device__ __forceinline__ void fill_small_table(
    SmallBin* __restrict__ table, const R* __restrict__ rois, i64 rs0, i64 rs1, i64 N, i64 H,
    i64 W, i64 sN, i64 sH, i64 sW, double spatial_scale, i64 PH, i64 PW, i64 first_roi,
    unsigned int count, long long* __restrict__ bad_roi_log) {
  typedef typename Rois<R>::G G;
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  const int w_int = static_cast<int>(W);  // H * W < 2^31 (checked by roi_ops)
  for (unsigned int e = threadIdx.x; e < count * bins; e += blockDim.x) {
    const unsigned int r = e / bins;
    const unsigned int q = e - r * bins;
    const i64 k = first_roi + r;
    const R* __restrict__ row = rois + k * rs0;
    const RoiGeometry<G> g = roi_geometry<R>(row, rs1, N, spatial_scale, PH, PW);
    const bool valid = g.batch >= 0;
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    const unsigned int pw = q - ph * static_cast<unsigned int>(PW);
    const int2 rows = bin_span<G>(ph, g.bin_h, g.y1, H, valid);
    const int2 cols = bin_span<G>(pw, g.bin_w, g.x1, W, valid);
    SmallBin bin;
    bin.corner = (valid ? g.batch : 0) * sN + rows.x * sH + cols.x * sW;
    bin.bin_h = rows.y - rows.x;
    bin.bin_w = cols.y - cols.x;
    bin.first_index = rows.x * w_int + cols.x;
    bin.level = 0;
    table[e] = bin;
    if (!valid && q == 0 && bad_roi_log != nullptr) {
      record_bad_row<R>(bad_roi_log, row, rs1, k, N);
    }
  }
  __syncthreads();
}

// The same for the multi-level kernels: each ROI's bins on the map of its level, each corner the
// address of the bin's first element (in channel 0); a ROI with no level gets empty bins, and
// is recorded only when its row is invalid.
template <class T, class R>
__device__ __forceinline__ void fill_small_table_levels(
    SmallBin* __restrict__ table, const LevelMaps<T>& maps, i64 L, const i64* __restrict__ levels,
    i64 ls0, const R* __restrict__ rois, i64 rs0, i64 rs1, i64 N, i64 PH, i64 PW, i64 first_roi,
    unsigned int count, long long* __restrict__ bad_roi_log) {
  typedef typename Rois<R>::G G;
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  for (unsigned int e = threadIdx.x; e < count * bins; e += blockDim.x) {
    const unsigned int r = e / bins;
    const unsigned int q = e - r * bins;
    const i64 k = first_roi + r;
    const R* __restrict__ row = rois + k * rs0;
    const int level = roi_level(levels, ls0, k, L);
    const LevelMap<T>& map = maps.level[level < 0 ? 0 : level];
    const RoiGeometry<G> g =
        roi_geometry<R>(row, rs1, level < 0 ? 0 : N, map.spatial_scale, PH, PW);
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    const unsigned int pw = q - ph * static_cast<unsigned int>(PW);
    SmallBin bin = small_bin<G>(g, ph, pw, map.H, map.W, map.sN, map.sH, map.sW);
    bin.corner = reinterpret_cast<i64>(map.input + bin.corner);  // an address: see SmallBin
    bin.level = level < 0 ? 0 : level;
    table[e] = bin;
    if (g.batch < 0 && q == 0 && bad_roi_log != nullptr && !roi_valid<R>(row, rs1, N)) {
      record_bad_row<R>(bad_roi_log, row, rs1, k, N);
    }
  }
  __syncthreads();
}

// The block's ROI count: rois_per_block, fewer in the last block (the grid is ceil(K / R)).
__device__ __forceinline__ unsigned int small_count(i64 first_roi, i64 rois_per_block, i64 K) {
  return static_cast<unsigned int>(K - first_roi < rois_per_block ? K - first_roi
                                                                  : rois_per_block);
}

// The small kernel's outputs (its loop after the table) in the multi-level kernel: each bin's
// corner is the address of its first element (fill_small_table_levels), and its level's channel
// and row strides and width come from the level's map.
template <class T, bool kArgmax>
__device__ __forceinline__ void small_outputs_levels(
    const SmallBin* __restrict__ table, const LevelMaps<T>& maps, i64 C, unsigned int bins,
    i64 first_roi, unsigned int count, unsigned int tid, unsigned int step,
    T* __restrict__ output, int* __restrict__ argmax) {
  const unsigned int per_roi = static_cast<unsigned int>(C) * bins;
  const unsigned int total = count * per_roi;
  const unsigned int step_r = step / per_roi;
  const unsigned int step_c = (step - step_r * per_roi) / bins;
  const unsigned int step_q = step - step_r * per_roi - step_c * bins;
  unsigned int r = tid / per_roi;
  unsigned int c = (tid - r * per_roi) / bins;
  unsigned int q = tid - r * per_roi - c * bins;
  T* __restrict__ const out = output + first_roi * per_roi;
  int* __restrict__ const arg = kArgmax ? argmax + first_roi * per_roi : nullptr;
  for (unsigned int e = tid; e < total; e += step) {
    const SmallBin bin = table[r * bins + q];
    const LevelMap<T>& map = maps.level[bin.level];
    const bool empty = bin.bin_h <= 0 || bin.bin_w <= 0;
    const T* __restrict__ plane =
        reinterpret_cast<const T*>(bin.corner) + static_cast<i64>(c) * map.sC;
    if constexpr (!kArgmax && NaNMax<T>::kEnabled) {
      unit_max_no_argmax<T, 1, false>(plane, 0, map.sH, 1, 1, bin.bin_h, bin.bin_w, empty,
                                      out + e, 0);
    } else {
      unit_max_compare<T, 1, kArgmax, false>(
          plane, 0, map.sH, 1, 1, bin.bin_h, bin.bin_w, empty, static_cast<int>(map.W),
          bin.first_index, out + e, kArgmax ? arg + e : nullptr, 0);
    }
    q += step_q;
    c += step_c;
    r += step_r;
    if (q >= bins) {
      q -= bins;
      ++c;
    }
    if (c >= C) {
      c -= static_cast<unsigned int>(C);
      ++r;
    }
  }
}
}  // namespace roi_ops_cuda

template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::SmallBlocksPerSM<T>::value)
    roi_pool_forward_small(const T* __restrict__ input, const i64 N, const i64 C, const i64 H,
                           const i64 W, const i64 sN, const i64 sC, const i64 sH, const i64 sW,
                           const R* __restrict__ rois, const i64 rs0, const i64 rs1,
                           const double spatial_scale, const i64 PH, const i64 PW,
                           const i64 rois_per_block, const i64 K, T* __restrict__ output,
                           int* __restrict__ argmax, long long* __restrict__ bad_roi_log) {
  using namespace roi_ops_cuda;
  (void)sW;  // 1: the launch plan picks this kernel only for a unit W stride
  SmallBin* const table = reinterpret_cast<SmallBin*>(roi_dynamic_shared);
  const unsigned int tid = threadIdx.x;
  const unsigned int step = blockDim.x;
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  const i64 first_roi = static_cast<i64>(blockIdx.x) * rois_per_block;
  const unsigned int count = small_count(first_roi, rois_per_block, K);
  const int w_int = static_cast<int>(W);  // H * W < 2^31 (checked by roi_ops)
  fill_small_table<R>(table, rois, rs0, rs1, N, H, W, sN, sH, 1, spatial_scale, PH, PW,
                      first_roi, count, bad_roi_log);
  if (C == 0) return;  // nothing to pool (the table still recorded the block's bad ROIs)
  // The block's outputs, (ROI, channel, bin) with the bin fastest: thread tid takes tid, then
  // every step-th, counting (r, c, q) with carries (no division in the loop).
  const unsigned int per_roi = static_cast<unsigned int>(C) * bins;
  const unsigned int total = count * per_roi;
  const unsigned int step_r = step / per_roi;
  const unsigned int step_c = (step - step_r * per_roi) / bins;
  const unsigned int step_q = step - step_r * per_roi - step_c * bins;
  unsigned int r = tid / per_roi;
  unsigned int c = (tid - r * per_roi) / bins;
  unsigned int q = tid - r * per_roi - c * bins;
  T* __restrict__ const out = output + first_roi * per_roi;
  int* __restrict__ const arg = kArgmax ? argmax + first_roi * per_roi : nullptr;
  for (unsigned int e = tid; e < total; e += step) {
    const SmallBin bin = table[r * bins + q];
    const bool empty = bin.bin_h <= 0 || bin.bin_w <= 0;
    const T* __restrict__ plane = input + bin.corner + static_cast<i64>(c) * sC;
    if constexpr (!kArgmax && NaNMax<T>::kEnabled) {
      unit_max_no_argmax<T, 1, false>(plane, 0, sH, 1, 1, bin.bin_h, bin.bin_w, empty, out + e,
                                      0);
    } else {
      unit_max_compare<T, 1, kArgmax, false>(plane, 0, sH, 1, 1, bin.bin_h, bin.bin_w, empty,
                                             w_int, bin.first_index, out + e,
                                             kArgmax ? arg + e : nullptr, 0);
    }
    q += step_q;
    c += step_c;
    r += step_r;
    if (q >= bins) {
      q -= bins;
      ++c;
    }
    if (c >= C) {
      c -= static_cast<unsigned int>(C);
      ++r;
    }
  }
}

// ---- roi_pool_forward_small_levels<T, R, kArgmax>: the small kernel over pyramid levels -----
// Each (ROI, bin) of the table on the map of the ROI's level (common.cuh: LevelMaps); a ROI
// with no level pools nothing. Every level has a unit W stride. Arguments: the L maps, the (K,)
// int64 levels (row stride ls0), then as the small kernel's without the map's.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads,
                                  roi_ops_cuda::SmallLevelsBlocksPerSM<T>::value)
    roi_pool_forward_small_levels(const roi_ops_cuda::LevelMaps<T> maps, const i64 L,
                                  const i64* __restrict__ levels, const i64 ls0, const i64 N,
                                  const i64 C, const R* __restrict__ rois, const i64 rs0,
                                  const i64 rs1, const i64 PH, const i64 PW,
                                  const i64 rois_per_block, const i64 K, T* __restrict__ output,
                                  int* __restrict__ argmax, long long* __restrict__ bad_roi_log) {
  using namespace roi_ops_cuda;
  SmallBin* const table = reinterpret_cast<SmallBin*>(roi_dynamic_shared);
  const unsigned int tid = threadIdx.x;
  const unsigned int step = blockDim.x;
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  const i64 first_roi = static_cast<i64>(blockIdx.x) * rois_per_block;
  const unsigned int count = small_count(first_roi, rois_per_block, K);
  fill_small_table_levels<T, R>(table, maps, L, levels, ls0, rois, rs0, rs1, N, PH, PW,
                                first_roi, count, bad_roi_log);
  if (C == 0) return;  // nothing to pool (the table still recorded the block's bad ROIs)
  small_outputs_levels<T, kArgmax>(table, maps, C, bins, first_roi, count, tid, step, output,
                                   argmax);
}
