// ---- roi_pool_forward_plane<T, R, kArgmax>: any input layout, one channel at a time ----------
// One block per (ROI, channel block). Each thread keeps one bin (geometry computed once, in
// registers) for every channel it visits (PlaneLayout): with nb = PH * PW <= 256 the block is
// floor(256 / nb) groups of nb threads (rounded up to a warp), so one step of all groups stores
// floor(256 / nb) * nb consecutive outputs; larger nb runs 256 threads that loop over bins.
// Compares integer order keys of the bits. For inputs whose W stride is not 1 and that are not
// channels_last.
//
// Shapes and strides are in elements. Grid (K, channel blocks); argmax may be null when kArgmax
// is false; bad_roi_log may be null.
namespace roi_ops_cuda {
// The plane kernel's work in block (k, channel blocks) of ROI k on one map (input, its sizes and
// strides, spatial_scale). num_images: N, or 0 for a ROI that pools nothing (every bin empty).
// Returns false in a thread with nothing to do (no barrier follows).
template <class T, class R, bool kArgmax>
__device__ __forceinline__ bool plane_roi(const T* __restrict__ input, const i64 num_images,
                                          const i64 C, const i64 H, const i64 W, const i64 sN,
                                          const i64 sC, const i64 sH, const i64 sW,
                                          const R* __restrict__ row, const i64 rs1,
                                          const double spatial_scale, const i64 PH, const i64 PW,
                                          const i64 channels_per_block, T* __restrict__ output,
                                          int* __restrict__ argmax, const i64 k) {
  typedef typename Rois<R>::G G;
  const RoiGeometry<G> g = roi_geometry<R>(row, rs1, num_images, spatial_scale, PH, PW);
  const PlaneLayout layout(PH, PW, threadIdx.x, blockDim.x);
  if (!layout.active) return false;
  const bool valid = g.batch >= 0;
  const T* __restrict__ image = input + (valid ? g.batch : 0) * sN;
  for (unsigned int q = layout.first_bin; q < layout.bins; q += layout.bin_step()) {
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    const unsigned int pw = q - ph * static_cast<unsigned int>(PW);
    const int2 rows = bin_span<G>(ph, g.bin_h, g.y1, H, valid);
    const int2 cols = bin_span<G>(pw, g.bin_w, g.x1, W, valid);
    for (i64 c0 = blockIdx.y * channels_per_block; c0 < C;
         c0 += gridDim.y * channels_per_block) {
      const i64 channels = C - c0 < channels_per_block ? C - c0 : channels_per_block;
      const i64 out0 = (k * C + c0) * layout.bins + q;
      for (i64 cl = layout.first_channel; cl < channels; cl += layout.groups) {
        const BinMax<T> m = bin_max<T>(image + (c0 + cl) * sC, rows, cols, sH, sW, W);
        output[out0 + cl * layout.bins] = m.value;
        if (kArgmax) argmax[out0 + cl * layout.bins] = m.index;
      }
    }
  }
  return true;
}

// float64 needs more than 48 registers with the bad-ROI record: four blocks per SM for it. The
// multi-level kernel holds its level's map in registers (the single-level kernel reads it from
// its parameters): four blocks for every dtype.
template <class T>
struct PlaneBlocksPerSM {
  static constexpr int value = sizeof(T) == 8 ? 4 : kBlocksPerSM;
};
constexpr int kPlaneLevelsBlocksPerSM = 4;
}  // namespace roi_ops_cuda

template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::PlaneBlocksPerSM<T>::value)
    roi_pool_forward_plane(ROI_OPS_MAP_PARAMETERS, const i64 channels_per_block,
                           ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  const i64 k = blockIdx.x;
  if (!plane_roi<T, R, kArgmax>(input, N, C, H, W, sN, sC, sH, sW, rois + k * rs0, rs1,
                                spatial_scale, PH, PW, channels_per_block, output, argmax, k)) {
    return;
  }
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}

// ---- roi_pool_forward_plane_levels<T, R, kArgmax>: the plane kernel over pyramid levels ------
// Block (k, channel blocks) pools ROI k from the map of its level (common.cuh: LevelMaps), any
// strides; a ROI with no level pools nothing. Arguments: the L maps, the (K,) int64 levels (row
// stride ls0), then as the plane kernel's without the map's.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kPlaneLevelsBlocksPerSM)
    roi_pool_forward_plane_levels(ROI_OPS_LEVELS_PARAMETERS, const i64 channels_per_block,
                                  ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  const i64 k = blockIdx.x;
  const int level = roi_level(levels, ls0, k, L);
  const LevelMap<T>& map = maps.level[level < 0 ? 0 : level];
  if (!plane_roi<T, R, kArgmax>(map.input, level < 0 ? 0 : N, C, map.H, map.W, map.sN, map.sC,
                                map.sH, map.sW, rois + k * rs0, rs1, map.spatial_scale, PH, PW,
                                channels_per_block, output, argmax, k)) {
    return;
  }
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}
