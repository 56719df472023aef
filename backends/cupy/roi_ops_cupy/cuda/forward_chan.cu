// ---- roi_pool_forward_chan<T, R, kArgmax>: channels adjacent in memory, unaligned ------------
// For channels_last inputs whose channel vectors are not 16-byte aligned (aligned ones take the
// cvec kernel). One block of (32, 8) threads per (ROI, 32 channels): the 32 lanes run over
// adjacent channels, so loads are coalesced; the 8 warps split the bins, whose edges the block
// caches in dynamic shared memory (8 * (PH + PW) bytes, unless cache_edges is 0). Results are
// staged in shared memory and stored in output order.
namespace roi_ops_cuda {
constexpr int kChanLanes = 32;  // channels per block
constexpr int kChanWarps = kThreads / kChanLanes;
constexpr int kChanBins = 64;  // bins staged in shared memory per round

// The chan kernel's work in block (k, channel blocks) of ROI k on one map (input, its sizes and
// strides, spatial_scale). num_images: N, or 0 for a ROI that pools nothing (every bin empty).
// Every thread of the block runs it (it has barriers).
template <class T, class R, bool kArgmax>
__device__ __forceinline__ void chan_roi(const T* __restrict__ input, const i64 num_images,
                                         const i64 C, const i64 H, const i64 W, const i64 sN,
                                         const i64 sC, const i64 sH, const i64 sW,
                                         const R* __restrict__ row, const i64 rs1,
                                         const double spatial_scale, const i64 PH, const i64 PW,
                                         const i64 cache_edges, T* __restrict__ output,
                                         int* __restrict__ argmax, const i64 k) {
  typedef typename Rois<R>::G G;
  // [bin][channel], padded so that both the lane-per-channel writes and the bin-major reads
  // are free of bank conflicts.
  __shared__ T tile_value[kChanBins][kChanLanes + 1];
  __shared__ int tile_index[kChanBins][kChanLanes + 1];
  int2* const edges = reinterpret_cast<int2*>(roi_dynamic_shared);
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int tid = warp * kChanLanes + lane;
  const RoiGeometry<G> g = roi_geometry<R>(row, rs1, num_images, spatial_scale, PH, PW);
  const bool cached = cache_edges != 0;
  if (cached) fill_edge_cache<G>(edges, g, PH, PW, H, W, tid);
  const int nb = static_cast<int>(PH * PW);  // < 2^31 (checked by the backend)
  const int pw_count = static_cast<int>(PW);
  const T* __restrict__ image = input + (g.batch > 0 ? g.batch : 0) * sN;
  for (i64 c0 = static_cast<i64>(blockIdx.y) * kChanLanes; c0 < C;
       c0 += static_cast<i64>(gridDim.y) * kChanLanes) {
    const int channels = C - c0 < kChanLanes ? static_cast<int>(C - c0) : kChanLanes;
    const bool active = lane < channels;
    const T* __restrict__ plane = image + (c0 + (active ? lane : 0)) * sC;
    for (int q0 = 0; q0 < nb; q0 += kChanBins) {
      const int bins = nb - q0 < kChanBins ? nb - q0 : kChanBins;
      for (int qi = warp; qi < bins; qi += kChanWarps) {
        const int ph = (q0 + qi) / pw_count;
        const int pw = q0 + qi - ph * pw_count;
        if (active) {
          const BinMax<T> m = bin_max<T>(plane, row_span<G>(edges, g, cached, ph, H),
                                         col_span<G>(edges, g, cached, PH, pw, W), sH, sW, W);
          tile_value[qi][lane] = m.value;
          if (kArgmax) tile_index[qi][lane] = m.index;
        }
      }
      __syncthreads();
      // Store channel by channel, bins contiguous: all of it contiguous when nb <= kChanBins.
      const i64 out0 = (k * C + c0) * nb + q0;
      for (int e = tid; e < channels * bins; e += kThreads) {
        const int cl = e / bins;
        const int qi = e - cl * bins;
        const i64 o = out0 + static_cast<i64>(cl) * nb + qi;
        output[o] = tile_value[qi][cl];
        if (kArgmax) argmax[o] = tile_index[qi][cl];
      }
      __syncthreads();
    }
  }
}
}  // namespace roi_ops_cuda

template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kBlocksPerSM)
    roi_pool_forward_chan(ROI_OPS_MAP_PARAMETERS, const i64 cache_edges, ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  const i64 k = blockIdx.x;
  chan_roi<T, R, kArgmax>(input, N, C, H, W, sN, sC, sH, sW, rois + k * rs0, rs1, spatial_scale,
                          PH, PW, cache_edges, output, argmax, k);
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}

// ---- roi_pool_forward_chan_levels<T, R, kArgmax>: the chan kernel over pyramid levels --------
// Block (k, channel blocks) pools ROI k from the map of its level (common.cuh: LevelMaps); a ROI
// with no level pools nothing. Arguments: the L maps, the (K,) int64 levels (row stride ls0),
// then as the chan kernel's without the map's.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kBlocksPerSM)
    roi_pool_forward_chan_levels(ROI_OPS_LEVELS_PARAMETERS, const i64 cache_edges,
                                 ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  const i64 k = blockIdx.x;
  const int level = roi_level(levels, ls0, k, L);
  const LevelMap<T>& map = maps.level[level < 0 ? 0 : level];
  chan_roi<T, R, kArgmax>(map.input, level < 0 ? 0 : N, C, map.H, map.W, map.sN, map.sC, map.sH,
                          map.sW, rois + k * rs0, rs1, map.spatial_scale, PH, PW, cache_edges,
                          output, argmax, k);
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}
