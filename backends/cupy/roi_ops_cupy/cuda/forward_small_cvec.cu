// ---- roi_pool_forward_small_cvec<T, R, kArgmax>: channels_last, many ROIs with few outputs --
// The small kernel's decomposition (forward_small.cu) for the cvec kernel's inputs
// (forward_cvec.cu: channels_last, 16-byte aligned channel vectors): where each ROI has few
// outputs (e.g. 64 channels of 3 x 3 bins), the cvec kernel's one ROI per block keeps most of
// its threads idle (9 bins x 8 threads of 256). Here a block covers `rois_per_block`
// consecutive ROIs: the shared-memory table of their bins' spans first, then work items
// (ROI, bin, vector of the thread's CvecShape<T>::kChannels channels), the vector fastest, so
// that adjacent threads read adjacent 16-byte channel vectors of one pixel (cvec_bin), with the
// results staged in shared memory, then stored contiguously in output order.
//
// Arguments as the small kernel's. Dynamic shared memory: the table (rois_per_block * PH * PW
// SmallBin), then as many tile rows of width = ceil(C / kChannels) * kChannels + 1 Lanes<T>::Word
// values, then (kArgmax) as many of ints. C a multiple of Lanes<T>::kCount; the input pointer
// and sN, sH, sW 16-byte aligned (sC == 1).
namespace roi_ops_cuda {
// The small_cvec kernel after its table (all threads of the block): work items (ROI, bin,
// vector) into the tile, then the tile out in output order.
template <class T, bool kArgmax, class Maps>
__device__ __forceinline__ void small_cvec_outputs(const SmallBin* __restrict__ table,
                                                   const Maps& maps, i64 C, unsigned int bins,
                                                   i64 rois_per_block, i64 first_roi,
                                                   unsigned int count, unsigned int tid,
                                                   unsigned int step, T* __restrict__ output,
                                                   int* __restrict__ argmax) {
  typedef Lanes<T> L;
  typedef typename L::Word Word;
  constexpr int V = L::kCount;
  constexpr int kChannels = CvecShape<T>::kChannels;
  const unsigned int channels = static_cast<unsigned int>(C);
  const unsigned int per_roi = channels * bins;
  // The tile: one row per (ROI, bin) of every vector's channels, padded by one word so that the
  // stores' reads (bin fastest) do not all hit one bank; argmax rows after the value rows.
  const unsigned int vectors = (channels + kChannels - 1) / kChannels;
  const unsigned int width = vectors * kChannels + 1;
  const unsigned int rows = static_cast<unsigned int>(rois_per_block) * bins;
  Word* const tile_value = reinterpret_cast<Word*>(const_cast<SmallBin*>(table) + rows);
  int* const tile_index = reinterpret_cast<int*>(tile_value + rows * width);
  // Work items (r * bins + q, v), v fastest: v counts vectors of kChannels channels.
  for (unsigned int item = tid; item < count * bins * vectors; item += step) {
    const unsigned int rq = item / vectors;
    const unsigned int c0 = (item - rq * vectors) * kChannels;
    const SmallBin bin = table[rq];
    Word* const values = tile_value + rq * width + c0;
    int* const indices = kArgmax ? tile_index + rq * width + c0 : nullptr;
    if (bin.bin_h <= 0 || bin.bin_w <= 0) {
#pragma unroll
      for (int c = 0; c < kChannels; ++c) {
        values[c] = L::word(Work<T>::out(typename Work<T>::V(0)));
        if constexpr (kArgmax) indices[c] = -1;
      }
    } else {
      const int second = c0 + V < channels ? V : 0;  // kVectors == 2: the next vector, if any
      const LevelMap<T>& map = maps.of(bin);
      cvec_bin<T, kArgmax>(maps.corner(bin) + c0, second, map.sH, map.sW, bin.bin_h, bin.bin_w,
                           bin.first_index, static_cast<int>(map.W), values, indices,
                           CvecSlots{1, V});
    }
  }
  __syncthreads();
  // The block's outputs in memory order (r, channel, q), read across the tile's rows.
  T* __restrict__ const out = output + first_roi * per_roi;
  int* __restrict__ const arg = kArgmax ? argmax + first_roi * per_roi : nullptr;
  OutputWalk at(tid, step, channels, bins);
  for (unsigned int e = tid; e < count * per_roi; e += step) {
    const unsigned int tile_at = (at.r * bins + at.q) * width + at.c;
    store_result<T>(out + e, L::from_word(tile_value[tile_at]));
    if constexpr (kArgmax) store_result<int>(arg + e, tile_index[tile_at]);
    at.advance();
  }
}
}  // namespace roi_ops_cuda

template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kCvecBlocksPerSM)
    roi_pool_forward_small_cvec(ROI_OPS_MAP_PARAMETERS, const i64 rois_per_block, const i64 K,
                                ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  const i64 first_roi = static_cast<i64>(blockIdx.x) * rois_per_block;
  const unsigned int count = small_count(first_roi, rois_per_block, K);
  SmallBin* const table = reinterpret_cast<SmallBin*>(roi_dynamic_shared);
  const OneMap<T> map = {{input, H, W, sN, sC, sH, sW, spatial_scale}};
  fill_small_table<R>(table, map, rois, rs0, rs1, N, PH, PW, first_roi, count, bad_roi_log);
  if (C == 0) return;  // nothing to pool (the table still recorded the block's bad ROIs)
  small_cvec_outputs<T, kArgmax>(table, map, C, static_cast<unsigned int>(PH * PW),
                                 rois_per_block, first_roi, count, threadIdx.x, blockDim.x,
                                 output, argmax);
}

// ---- roi_pool_forward_small_cvec_levels<T, R, kArgmax>: small_cvec over pyramid levels ------
// Each (ROI, bin) of the table on the map of the ROI's level (common.cuh: LevelMaps); a ROI
// with no level pools nothing. Every level is one the cvec kernel can read. Arguments: the L
// maps, the (K,) int64 levels (row stride ls0), then as the small_cvec kernel's without the
// map's.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kCvecBlocksPerSM)
    roi_pool_forward_small_cvec_levels(ROI_OPS_LEVELS_PARAMETERS, const i64 rois_per_block,
                                       const i64 K, ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  const i64 first_roi = static_cast<i64>(blockIdx.x) * rois_per_block;
  const unsigned int count = small_count(first_roi, rois_per_block, K);
  SmallBin* const table = reinterpret_cast<SmallBin*>(roi_dynamic_shared);
  const PyramidMaps<T> pyramid = {maps, L, levels, ls0};
  fill_small_table<R>(table, pyramid, rois, rs0, rs1, N, PH, PW, first_roi, count, bad_roi_log);
  if (C == 0) return;  // nothing to pool (the table still recorded the block's bad ROIs)
  small_cvec_outputs<T, kArgmax>(table, pyramid, C, static_cast<unsigned int>(PH * PW),
                                 rois_per_block, first_roi, count, threadIdx.x, blockDim.x,
                                 output, argmax);
}
