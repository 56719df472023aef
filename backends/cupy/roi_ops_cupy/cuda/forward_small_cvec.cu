// ---- roi_pool_forward_small_cvec<T, R, kArgmax>: channels_last, many ROIs with few outputs --
// The small kernel's decomposition (forward_small.cu) for the cvec kernel's inputs
// (forward_cvec.cu: channels_last, 16-byte aligned channel vectors): where each ROI has few
// outputs (e.g. 64 channels of 3 x 3 bins), the cvec kernel's one ROI per block keeps most of
// its threads idle (9 bins x 8 threads of 256). Here a block covers `rois_per_block`
// consecutive ROIs: the shared-memory table of their bins' spans first, then work items
// (ROI, bin, vector of the thread's CvecShape<T, kArgmax>::kChannels channels), the vector
// fastest, so that adjacent threads read adjacent 16-byte channel vectors of one pixel
// (cvec_bin), with the results staged in a shared tile laid out as the block's outputs, then
// copied out as the cvec kernel copies its tile.
//
// Arguments as the small kernel's. Dynamic shared memory (SmallCvecTile): rois_per_block * PH *
// PW * ceil(C / kChannels) * kChannels slots of values, then (kArgmax) as many ints, then the
// table (rois_per_block * PH * PW SmallBin). C a multiple of Lanes<T>::kCount; the input pointer
// and sN, sH, sW 16-byte aligned (sC == 1).
namespace roi_ops_cuda {
// The small_cvec kernel's dynamic shared memory: a tile laid out as the block's outputs (ROI,
// channel, bin), each ROI's channels padded to whole threads' (a thread's vectors beyond C
// are written past it), its argmax part after the values (kArgmax); then the table. As the
// cvec kernel's tile, a slot holds a value's own bits, or with the argmax a 16-bit value in a
// 32-bit slot, so that a value and its argmax sit at the same offset of their parts.
template <class T, bool kArgmax>
struct SmallCvecTile {
  typedef typename TileBits<kArgmax && sizeof(T) == 2 ? 4 : sizeof(T)>::type Slot;
  static constexpr int kSlotBytes = sizeof(Slot) + (kArgmax ? 4 : 0);
  static __device__ __forceinline__ unsigned int padded(unsigned int channels) {
    constexpr unsigned int kChannels = CvecShape<T, kArgmax>::kChannels;
    return (channels + kChannels - 1) / kChannels * kChannels;
  }
  // The table after the tile (a multiple of 16 bytes: a thread's channels take 32 of slots).
  static __device__ __forceinline__ SmallBin* table(i64 C, i64 bins, i64 rois_per_block) {
    const i64 slots = rois_per_block * bins * padded(static_cast<unsigned int>(C));
    return reinterpret_cast<SmallBin*>(roi_dynamic_shared + slots * kSlotBytes);
  }
};

// The small_cvec kernel after its table (all threads of the block): work items (ROI, bin,
// vector) into the tile, then the tile out: one contiguous run of the output when no padding is
// needed, copied in 16-byte pieces.
template <class T, bool kArgmax, class Maps>
__device__ __forceinline__ void small_cvec_outputs(const SmallBin* __restrict__ table,
                                                   const Maps& maps, i64 C, unsigned int bins,
                                                   i64 rois_per_block, i64 first_roi,
                                                   unsigned int count, unsigned int tid,
                                                   T* __restrict__ output,
                                                   int* __restrict__ argmax) {
  typedef typename TileBits<sizeof(T)>::type S;
  typedef typename SmallCvecTile<T, kArgmax>::Slot Slot;
  constexpr int V = Lanes<T>::kCount;
  constexpr int kChannels = CvecShape<T, kArgmax>::kChannels;
  const unsigned int channels = static_cast<unsigned int>(C);
  const unsigned int per_roi = channels * bins;
  const unsigned int vectors = (channels + kChannels - 1) / kChannels;
  const unsigned int padded = SmallCvecTile<T, kArgmax>::padded(channels);
  const unsigned int rows = static_cast<unsigned int>(rois_per_block) * bins;
  Slot* const tile_value = reinterpret_cast<Slot*>(roi_dynamic_shared);
  int* const tile_index = reinterpret_cast<int*>(tile_value + rows * padded);
  const CvecSlots slots = {static_cast<int>(bins), V};
  // Work items (r * bins + q, v), v fastest: v counts vectors of kChannels channels.
  for (unsigned int item = tid; item < count * bins * vectors; item += kThreads) {
    const unsigned int rq = item / vectors;
    const unsigned int c0 = (item - rq * vectors) * kChannels;
    const unsigned int r = rq / bins;
    const unsigned int at = (r * padded + c0) * bins + (rq - r * bins);
    const SmallBin bin = table[rq];
    Slot* const values = tile_value + at;
    int* const indices = tile_index + at;
    if (bin.bin_h <= 0 || bin.bin_w <= 0) {
#pragma unroll
      for (int c = 0; c < kChannels; ++c) {
        values[slots.at(c, V)] =
            static_cast<Slot>(Lanes<T>::word(Work<T>::out(typename Work<T>::V(0))));
        if constexpr (kArgmax) indices[slots.at(c, V)] = -1;
      }
    } else {
      const CvecVectors thread_vectors = CvecVectors::of(V, static_cast<int>(channels - c0) / V);
      const LevelMap<T>& map = maps.of(bin);
      cvec_bin<T, kArgmax, CvecShape<T, kArgmax>::kVectors>(
          maps.corner(bin) + c0, thread_vectors, map.sH, map.sW, bin.bin_h, bin.bin_w,
          bin.first_index, static_cast<int>(map.W), values, indices, slots);
    }
  }
  __syncthreads();
  const i64 out0 = first_roi * per_roi;
  if (padded == channels) {
    copy_tile_out<Slot, S>(tile_value, static_cast<int>(count * per_roi),
                           reinterpret_cast<S*>(output + out0), static_cast<int>(tid));
    if constexpr (kArgmax) {
      copy_tile_out<unsigned int, unsigned int>(
          reinterpret_cast<const unsigned int*>(tile_index), static_cast<int>(count * per_roi),
          reinterpret_cast<unsigned int*>(argmax + out0), static_cast<int>(tid));
    }
  } else {  // each ROI's outputs a run of its padded part of the tile
    for (unsigned int e = tid; e < count * per_roi; e += kThreads) {
      const unsigned int r = e / per_roi;
      const unsigned int t = r * padded * bins + (e - r * per_roi);
      store_streaming(reinterpret_cast<S*>(output) + out0 + e, static_cast<S>(tile_value[t]));
      if constexpr (kArgmax) store_streaming(reinterpret_cast<unsigned int*>(argmax) + out0 + e,
                                             static_cast<unsigned int>(tile_index[t]));
    }
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
  SmallBin* const table = SmallCvecTile<T, kArgmax>::table(C, PH * PW, rois_per_block);
  const OneMap<T> map = {{input, H, W, sN, sC, sH, sW, spatial_scale}};
  fill_small_table<R>(table, map, rois, rs0, rs1, N, PH, PW, first_roi, count, bad_roi_log);
  if (C == 0) return;  // nothing to pool (the table still recorded the block's bad ROIs)
  small_cvec_outputs<T, kArgmax>(table, map, C, static_cast<unsigned int>(PH * PW),
                                 rois_per_block, first_roi, count, threadIdx.x, output,
                                 argmax);
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
  SmallBin* const table = SmallCvecTile<T, kArgmax>::table(C, PH * PW, rois_per_block);
  const PyramidMaps<T> pyramid = {maps, L, levels, ls0};
  fill_small_table<R>(table, pyramid, rois, rs0, rs1, N, PH, PW, first_roi, count, bad_roi_log);
  if (C == 0) return;  // nothing to pool (the table still recorded the block's bad ROIs)
  small_cvec_outputs<T, kArgmax>(table, pyramid, C, static_cast<unsigned int>(PH * PW),
                                 rois_per_block, first_roi, count, threadIdx.x, output,
                                 argmax);
}
