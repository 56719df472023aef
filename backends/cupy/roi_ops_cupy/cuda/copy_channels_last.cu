// ---- roi_ops_copy_channels_last<T>: an input with a unit W stride, copied channels_last -------
// The staged forward (planning.stages_channels_last) pools a dense channels_last copy of an NCHW
// input with the channel-vector kernels. The copy is a transpose of each image's (C, H * W)
// matrix: a block moves a tile of kCopyTile channels by kCopyTile positions (h * W + w) through
// shared memory, reading rows of positions and writing rows of channels, so that both the
// loads and the stores of a warp are runs of consecutive addresses. Values are moved as bits.
//
// Grid: x = N * position_tiles (image-major), y = ceil(C / kCopyTile); block kCopyTile x
// kCopyRows. Input strides in elements, sW == 1; the output is dense (N, H, W, C).
namespace roi_ops_cuda {
constexpr int kCopyTile = 32;
constexpr int kCopyRows = 8;
}  // namespace roi_ops_cuda

template <class T>
__global__ void __launch_bounds__(roi_ops_cuda::kCopyTile * roi_ops_cuda::kCopyRows)
    roi_ops_copy_channels_last(const T* __restrict__ input, const i64 C, const i64 H, const i64 W,
                               const i64 sN, const i64 sC, const i64 sH, const i64 position_tiles,
                               T* __restrict__ output) {
  using namespace roi_ops_cuda;
  // One padding column: a warp's column reads (fixed position, 32 channels) spread over banks.
  __shared__ T tile[kCopyTile][kCopyTile + 1];
  const i64 n = static_cast<i64>(blockIdx.x) / position_tiles;
  const i64 p0 = (static_cast<i64>(blockIdx.x) - n * position_tiles) * kCopyTile;
  const i64 c0 = static_cast<i64>(blockIdx.y) * kCopyTile;
  const i64 HW = H * W;
  const int x = threadIdx.x;
  const i64 p = p0 + x;  // the position this thread reads
  if (p < HW) {
    const i64 h = p / W;
    const T* __restrict__ source = input + n * sN + h * sH + (p - h * W);
#pragma unroll
    for (int r = threadIdx.y; r < kCopyTile; r += kCopyRows) {
      if (c0 + r < C) tile[r][x] = source[(c0 + r) * sC];
    }
  }
  __syncthreads();
  const i64 c = c0 + x;  // the channel this thread writes
  if (c < C) {
    T* __restrict__ target = output + n * HW * C + c;
#pragma unroll
    for (int r = threadIdx.y; r < kCopyTile; r += kCopyRows) {
      if (p0 + r < HW) target[(p0 + r) * C] = tile[x][r];
    }
  }
}
