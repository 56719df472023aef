// ---- roi_ops_quad_table<T>: the maxima of every 2 x 2 block of a map, for inference -------------
// table[p, h, w] = max.NaN(input[p, h, w], input[p, h, w + 1], input[p, h + 1, w],
// input[p, h + 1, w + 1]) for h < H - 1 and w < W - 1 of each of the `planes` (N * C) planes of a
// dense NCHW map; the last row and column of each table plane are not written (no bin reads
// them). max.NaN may lose a NaN's payload or a zero's sign: the pooling kernel rereads the map
// for those results (unit_max_no_argmax). Each thread walks one column w down the rows of a
// plane, keeping the maximum of the row above's pair, so that each row is loaded once (its
// second element from the neighbouring thread's line in L1); blockIdx.y walks the planes. The
// table is read right after, by the unit quad kernel: plain stores (not evict-first). Without
// max.NaN (before sm_80) it writes nothing, and the unit quad kernel reads only the map.
namespace roi_ops_cuda {
constexpr int kQuadThreads = 128;  // kernels.QUAD_THREADS
}  // namespace roi_ops_cuda

template <class T>
__global__ void __launch_bounds__(roi_ops_cuda::kQuadThreads)
    roi_ops_quad_table(const T* __restrict__ input, const i64 planes, const i64 H, const i64 W,
                       T* __restrict__ table) {
  using namespace roi_ops_cuda;
  if constexpr (NaNMax<T>::kEnabled) {
    typedef typename NaNMax<T>::V V;
    const i64 w = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (w >= W - 1) return;
    for (i64 plane = blockIdx.y; plane < planes; plane += gridDim.y) {
      const T* __restrict__ line = input + plane * H * W + w;
      T* __restrict__ out = table + plane * H * W + w;
      V above = NaNMax<T>::max(NaNMax<T>::load(line), NaNMax<T>::load(line + 1));
      for (i64 h = 1; h < H; ++h) {
        line += W;
        const V below = NaNMax<T>::max(NaNMax<T>::load(line), NaNMax<T>::load(line + 1));
        *out = NaNMax<T>::bits(NaNMax<T>::max(above, below));
        out += W;
        above = below;
      }
    }
  } else {
    (void)input, (void)planes, (void)H, (void)W, (void)table;
  }
}
