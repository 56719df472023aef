// ---- roi_ops_copy_channels_last<T>: an input with a unit W stride, copied channels_last -------
// The staged forward (planning.stages_channels_last) pools a dense channels_last copy of an NCHW
// input with the channel-vector kernels. The copy is a transpose of each image's (C, H * W)
// matrix: a block moves a tile of CopyTile<T> channels by CopyTile<T> positions (h * W + w)
// through shared memory, reading rows of positions and writing rows of channels, so that both
// the loads and the stores of a warp are runs of consecutive addresses, 128 bytes a row of the
// tile for 16-bit elements (64 a side) and at least that for wider ones (32 a side). Values are
// moved as bits.
//
// Grid: x = N * position_tiles (image-major), y = ceil(C / CopyTile<T>); block 32 x kCopyRows.
// Input strides in elements, sW == 1; the output is dense (N, H, W, C).
namespace roi_ops_cuda {
constexpr int kCopyRows = 8;
template <class T>
struct CopyTile {
  static constexpr int value = sizeof(T) == 2 ? 64 : 32;
};
}  // namespace roi_ops_cuda

template <class T>
__global__ void __launch_bounds__(32 * roi_ops_cuda::kCopyRows)
    roi_ops_copy_channels_last(const T* __restrict__ input, const i64 C, const i64 H, const i64 W,
                               const i64 sN, const i64 sC, const i64 sH, const i64 position_tiles,
                               T* __restrict__ output) {
  using namespace roi_ops_cuda;
  constexpr int kTile = CopyTile<T>::value;
  // One padding column: a warp's column reads (fixed position, 32 channels) spread over banks.
  __shared__ T tile[kTile][kTile + 1];
  const i64 n = static_cast<i64>(blockIdx.x) / position_tiles;
  const i64 p0 = (static_cast<i64>(blockIdx.x) - n * position_tiles) * kTile;
  const i64 c0 = static_cast<i64>(blockIdx.y) * kTile;
  const i64 HW = H * W;
  const T* __restrict__ image = input + n * sN;
#pragma unroll
  for (int x = threadIdx.x; x < kTile; x += 32) {  // the positions this thread reads
    const i64 p = p0 + x;
    if (p < HW) {
      const i64 h = p / W;
      const T* __restrict__ source = image + h * sH + (p - h * W);
#pragma unroll
      for (int r = threadIdx.y; r < kTile; r += kCopyRows) {
        if (c0 + r < C) tile[r][x] = source[(c0 + r) * sC];
      }
    }
  }
  __syncthreads();
  T* __restrict__ target = output + n * HW * C;
#pragma unroll
  for (int x = threadIdx.x; x < kTile; x += 32) {  // the channels this thread writes
    const i64 c = c0 + x;
    if (c < C) {
#pragma unroll
      for (int r = threadIdx.y; r < kTile; r += kCopyRows) {
        if (p0 + r < HW) target[(p0 + r) * C + c] = tile[x][r];
      }
    }
  }
}
