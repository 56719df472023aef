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
// float64 needs more than 48 registers with the bad-ROI record: four blocks per SM for it.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads,
                                  sizeof(T) == 8 ? 4 : roi_ops_cuda::kBlocksPerSM)
    roi_pool_forward_plane(const T* __restrict__ input, const i64 N, const i64 C, const i64 H,
                           const i64 W, const i64 sN, const i64 sC, const i64 sH, const i64 sW,
                           const R* __restrict__ rois, const i64 rs0, const i64 rs1,
                           const double spatial_scale, const i64 PH, const i64 PW,
                           const i64 channels_per_block, T* __restrict__ output,
                           int* __restrict__ argmax, long long* __restrict__ bad_roi_log) {
  using namespace roi_ops_cuda;
  typedef typename Rois<R>::G G;
  const i64 k = blockIdx.x;
  const RoiGeometry<G> g = roi_geometry<R>(rois + k * rs0, rs1, N, spatial_scale, PH, PW);
  const PlaneLayout layout(PH, PW, threadIdx.x, blockDim.x);
  if (!layout.active) return;  // no barrier follows
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
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}
