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

// The maps a block's bins read. OneMap: the single-level kernels' map, whose table corners are
// offsets from its input. PyramidMaps: the multi-level kernels' table of levels, whose table
// corners are addresses (each ROI's bins on the map of its level, a ROI with no level pools
// nothing) and whose bins carry their level.
template <class T>
struct OneMap {
  static constexpr bool kLevels = false;
  LevelMap<T> map;
  __device__ __forceinline__ int level_of(i64) const { return 0; }
  __device__ __forceinline__ const LevelMap<T>& at(int) const { return map; }
  __device__ __forceinline__ void place(SmallBin&, int) const {}
  __device__ __forceinline__ const LevelMap<T>& of(const SmallBin&) const { return map; }
  __device__ __forceinline__ const T* corner(const SmallBin& bin) const {
    return map.input + bin.corner;
  }
};
template <class T>
struct PyramidMaps {
  static constexpr bool kLevels = true;
  const LevelMaps<T>& maps;
  i64 L;
  const i64* __restrict__ levels;
  i64 ls0;
  __device__ __forceinline__ int level_of(i64 k) const { return roi_level(levels, ls0, k, L); }
  __device__ __forceinline__ const LevelMap<T>& at(int level) const {
    return maps.level[level < 0 ? 0 : level];
  }
  __device__ __forceinline__ void place(SmallBin& bin, int level) const {
    bin.corner = reinterpret_cast<i64>(at(level).input + bin.corner);
    bin.level = level < 0 ? 0 : level;
  }
  __device__ __forceinline__ const LevelMap<T>& of(const SmallBin& bin) const {
    return maps.level[bin.level];
  }
  __device__ __forceinline__ const T* corner(const SmallBin& bin) const {
    return reinterpret_cast<const T*>(bin.corner);
  }
};

// Fills table[r * PH * PW + q] for the block's `count` ROIs from `first_roi` (all threads of
// the block; a barrier follows) and records the invalid ones in the bad-ROI log (null: none). A
// ROI with no level is recorded only when its row is invalid.
template <class R, class Maps>
__device__ __forceinline__ void fill_small_table(SmallBin* __restrict__ table, const Maps& maps,
                                                 const R* __restrict__ rois, i64 rs0, i64 rs1,
                                                 i64 N, i64 PH, i64 PW, i64 first_roi,
                                                 unsigned int count,
                                                 long long* __restrict__ bad_roi_log) {
  typedef typename Rois<R>::G G;
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  for (unsigned int e = threadIdx.x; e < count * bins; e += blockDim.x) {
    const unsigned int r = e / bins;
    const unsigned int q = e - r * bins;
    const i64 k = first_roi + r;
    const R* __restrict__ row = rois + k * rs0;
    const int level = maps.level_of(k);
    const auto& map = maps.at(level);
    const RoiGeometry<G> g =
        roi_geometry<R>(row, rs1, level < 0 ? 0 : N, map.spatial_scale, PH, PW);
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    const unsigned int pw = q - ph * static_cast<unsigned int>(PW);
    SmallBin bin = small_bin<G>(g, ph, pw, map.H, map.W, map.sN, map.sH, map.sW);
    maps.place(bin, level);
    table[e] = bin;
    if (g.batch < 0 && q == 0 && bad_roi_log != nullptr &&
        (!Maps::kLevels || !roi_valid<R>(row, rs1, N))) {
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

// The small kernel's outputs after its table, (ROI, channel, bin) with the bin fastest: thread
// tid takes output tid, then every step-th.
template <class T, bool kArgmax, class Maps>
__device__ __forceinline__ void small_outputs(const SmallBin* __restrict__ table, const Maps& maps,
                                              i64 C, unsigned int bins, i64 first_roi,
                                              unsigned int count, unsigned int tid,
                                              unsigned int step, T* __restrict__ output,
                                              int* __restrict__ argmax) {
  const unsigned int per_roi = static_cast<unsigned int>(C) * bins;
  const unsigned int total = count * per_roi;
  OutputWalk at(tid, step, static_cast<unsigned int>(C), bins);
  T* __restrict__ const out = output + first_roi * per_roi;
  int* __restrict__ const arg = kArgmax ? argmax + first_roi * per_roi : nullptr;
  for (unsigned int e = tid; e < total; e += step) {
    const SmallBin bin = table[at.r * bins + at.q];
    const LevelMap<T>& map = maps.of(bin);
    const bool empty = bin.bin_h <= 0 || bin.bin_w <= 0;
    const T* __restrict__ plane = maps.corner(bin) + static_cast<i64>(at.c) * map.sC;
    if constexpr (!kArgmax && NaNMax<T>::kEnabled) {
      unit_max_no_argmax<T, 1, false>(plane, 0, map.sH, 1, 1, bin.bin_h, bin.bin_w, empty,
                                      out + e, 0);
    } else {
      unit_max_compare<T, 1, kArgmax, false>(
          plane, 0, map.sH, 1, 1, bin.bin_h, bin.bin_w, empty, static_cast<int>(map.W),
          bin.first_index, out + e, kArgmax ? arg + e : nullptr, 0);
    }
    at.advance();
  }
}
}  // namespace roi_ops_cuda

template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::SmallBlocksPerSM<T>::value)
    roi_pool_forward_small(ROI_OPS_MAP_PARAMETERS, const i64 rois_per_block, const i64 K,
                           ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  (void)sW;  // 1: the launch plan picks this kernel only for a unit W stride
  SmallBin* const table = reinterpret_cast<SmallBin*>(roi_dynamic_shared);
  const i64 first_roi = static_cast<i64>(blockIdx.x) * rois_per_block;
  const unsigned int count = small_count(first_roi, rois_per_block, K);
  const OneMap<T> map = {{input, H, W, sN, sC, sH, 1, spatial_scale}};
  fill_small_table<R>(table, map, rois, rs0, rs1, N, PH, PW, first_roi, count, bad_roi_log);
  if (C == 0) return;  // nothing to pool (the table still recorded the block's bad ROIs)
  small_outputs<T, kArgmax>(table, map, C, static_cast<unsigned int>(PH * PW), first_roi, count,
                            threadIdx.x, blockDim.x, output, argmax);
}

// ---- roi_pool_forward_small_levels<T, R, kArgmax>: the small kernel over pyramid levels -----
// Each (ROI, bin) of the table on the map of the ROI's level (common.cuh: LevelMaps); a ROI
// with no level pools nothing. Every level has a unit W stride. Arguments: the L maps, the (K,)
// int64 levels (row stride ls0), then as the small kernel's without the map's.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads,
                                  roi_ops_cuda::SmallLevelsBlocksPerSM<T>::value)
    roi_pool_forward_small_levels(ROI_OPS_LEVELS_PARAMETERS, const i64 rois_per_block, const i64 K,
                                  ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  SmallBin* const table = reinterpret_cast<SmallBin*>(roi_dynamic_shared);
  const i64 first_roi = static_cast<i64>(blockIdx.x) * rois_per_block;
  const unsigned int count = small_count(first_roi, rois_per_block, K);
  const PyramidMaps<T> pyramid = {maps, L, levels, ls0};
  fill_small_table<R>(table, pyramid, rois, rs0, rs1, N, PH, PW, first_roi, count, bad_roi_log);
  if (C == 0) return;  // nothing to pool (the table still recorded the block's bad ROIs)
  small_outputs<T, kArgmax>(table, pyramid, C, static_cast<unsigned int>(PH * PW), first_roi,
                            count, threadIdx.x, blockDim.x, output, argmax);
}
