// ---- roi_pool_backward_atomic<T, R>: global atomics into a zero-filled grad_input ------------
// grad_input[b_k, c].flat[argmax] += grad_output with global atomic adds, in the plane kernel's
// thread layout: one block per (ROI, channel block). For few (image, channel) planes, or planes
// larger than a block's shared memory (otherwise the planes kernel runs). Not run-to-run
// deterministic (the order of the float additions varies).
//
// grad_input (N, C, H, W), zero-filled, of Accum<T>::type, with strides gi_image, gi_channel
// and gi_pixel (its W stride; the H stride is W * gi_pixel: contiguous or channels_last);
// grad_output any strides (zero strides too); argmax contiguous (K, C, PH, PW); rois the
// forward's (K, 5), row stride rs0 (the image of ROI k: `roi_image`). Grid (K, channel blocks).
namespace roi_ops_cuda {
// The atomic kernel's work in block (k, channel blocks) of ROI k, for an active thread of its
// layout: adds into `image` (the gradient of the ROI's image), of channel and pixel strides
// gi_channel and gi_pixel.
template <class T>
__device__ __forceinline__ void atomic_roi(const T* __restrict__ grad_output, const i64 gs0,
                                           const i64 gs1, const i64 gs2, const i64 gs3,
                                           const int* __restrict__ argmax, const i64 C,
                                           const i64 PH, const i64 PW,
                                           const i64 channels_per_block,
                                           typename Accum<T>::type* __restrict__ image,
                                           const i64 gi_channel, const i64 gi_pixel,
                                           const PlaneLayout& layout, const i64 k) {
  for (unsigned int q = layout.first_bin; q < layout.bins; q += layout.bin_step()) {
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    const unsigned int pw = q - ph * static_cast<unsigned int>(PW);
    const T* __restrict__ grad_bin = grad_output + k * gs0 + ph * gs2 + pw * gs3;
    for (i64 c0 = blockIdx.y * channels_per_block; c0 < C;
         c0 += gridDim.y * channels_per_block) {
      const i64 channels = C - c0 < channels_per_block ? C - c0 : channels_per_block;
      const i64 arg0 = (k * C + c0) * layout.bins + q;
      for (i64 cl = layout.first_channel; cl < channels; cl += layout.groups) {
        const int a = argmax[arg0 + cl * layout.bins];
        if (a < 0) continue;
        const T grad = grad_bin[(c0 + cl) * gs1];
        atomicAdd(image + (c0 + cl) * gi_channel + a * gi_pixel,
                  static_cast<typename Accum<T>::type>(Elem<T>::value_of(grad)));
      }
    }
  }
}
}  // namespace roi_ops_cuda

template <class T, class R>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kBlocksPerSM)
    roi_pool_backward_atomic(const T* __restrict__ grad_output, const i64 gs0, const i64 gs1,
                             const i64 gs2, const i64 gs3, const int* __restrict__ argmax,
                             const R* __restrict__ rois, const i64 rs0, const i64 N,
                             const i64 C, const i64 HW, const i64 PH, const i64 PW,
                             const i64 channels_per_block,
                             typename roi_ops_cuda::Accum<T>::type* __restrict__ grad_input,
                             const i64 gi_image, const i64 gi_channel, const i64 gi_pixel) {
  using namespace roi_ops_cuda;
  const i64 k = blockIdx.x;
  const PlaneLayout layout(PH, PW, threadIdx.x, blockDim.x);
  if (!layout.active) return;
  typename Accum<T>::type* __restrict__ image =
      grad_input + static_cast<i64>(roi_image<R>(rois, rs0, k, N)) * gi_image;
  atomic_roi<T>(grad_output, gs0, gs1, gs2, gs3, argmax, C, PH, PW, channels_per_block, image,
                gi_channel, gi_pixel, layout, k);
}

// ---- roi_pool_backward_atomic_levels<T, R>: the atomic backward over pyramid levels ----------
// Block (k, channel blocks) adds ROI k's gradients into the gradient of its level (common.cuh:
// LevelGrads: each level's zero-filled gradient of Accum<T>::type, contiguous or channels_last);
// a ROI with no level adds nothing. Arguments: the L gradients, the (K,) int64 levels (row
// stride ls0), then as the atomic kernel's without HW and the gradient's.
template <class T, class R>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kBlocksPerSM)
    roi_pool_backward_atomic_levels(
        const roi_ops_cuda::LevelGrads<typename roi_ops_cuda::Accum<T>::type> grads, const i64 L,
        const i64* __restrict__ levels, const i64 ls0, const T* __restrict__ grad_output,
        const i64 gs0, const i64 gs1, const i64 gs2, const i64 gs3,
        const int* __restrict__ argmax, const R* __restrict__ rois, const i64 rs0, const i64 N,
        const i64 C, const i64 PH, const i64 PW, const i64 channels_per_block) {
  using namespace roi_ops_cuda;
  typedef typename Accum<T>::type A;
  const i64 k = blockIdx.x;
  const PlaneLayout layout(PH, PW, threadIdx.x, blockDim.x);
  const int level = roi_level(levels, ls0, k, L);
  if (!layout.active || level < 0) return;
  const LevelGrad<A>& grad = grads.level[level];
  A* __restrict__ image =
      grad.grad_input + static_cast<i64>(roi_image<R>(rois, rs0, k, N)) * grad.gi_image;
  atomic_roi<T>(grad_output, gs0, gs1, gs2, gs3, argmax, C, PH, PW, channels_per_block, image,
                grad.gi_channel, grad.gi_pixel, layout, k);
}
