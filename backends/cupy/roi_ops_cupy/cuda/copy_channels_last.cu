// ---- roi_ops_copy_channels_last<T>: an input with a unit W stride, copied channels_last -------
// The staged forward (planning.stages_channels_last) pools a dense channels_last copy of an NCHW
// input with the channel-vector kernels. The copy is a transpose of each image's (C, H * W)
// matrix, moved as bits. A block takes kCopyPositions positions (h * W + w) by 128 bytes of
// channels: it reads rows of positions, one channel a warp instruction (consecutive addresses),
// into a shared tile kept position by position, then each thread gathers 16 bytes of one
// position's channels from it and writes them with one store, eight threads a position (128
// consecutive bytes). Each position's row of the tile is rotated by one 4-byte bank per position
// (by whole elements for 8-byte ones), so that a warp's 32 positions of one channel, and the
// 8-byte elements' half-warps, fall in distinct banks on both sides. Where C or the output's
// address does not allow 16-byte stores, each thread writes its channels one at a time.
//
// Grid: x = N * position_tiles (image-major), y = ceil(C / CopyTile<T>::kChannels); block
// 32 x kCopyRows. Input strides in elements, sW == 1; every offset within an image, of the input
// and of the copy, fits 32 bits (the plan checks); the output is dense (N, H, W, C).
namespace roi_ops_cuda {
constexpr int kCopyRows = 8;
constexpr int kCopyPositions = 64;
template <class T>
struct CopyTile {
  static constexpr int kChannels = 128 / sizeof(T);  // 128 bytes of a position's channels
  static constexpr int kVector = 16 / sizeof(T);     // channels a 16-byte store
  static constexpr int kRotation = sizeof(T) == 2 ? 2 : 1;  // columns a position turns its row
};
}  // namespace roi_ops_cuda

template <class T>
__global__ void __launch_bounds__(32 * roi_ops_cuda::kCopyRows)
    roi_ops_copy_channels_last(const T* __restrict__ input, const i64 C64, const i64 H64,
                               const i64 W64, const i64 sN, const i64 sC64, const i64 sH64,
                               const i64 position_tiles64, T* __restrict__ output) {
  using namespace roi_ops_cuda;
  typedef typename TileBits<sizeof(T)>::type B;
  constexpr int kChannels = CopyTile<T>::kChannels;
  constexpr int kVector = CopyTile<T>::kVector;
  constexpr int kRotation = CopyTile<T>::kRotation;
  constexpr int kVectors = kChannels / kVector;  // 8 threads a position
  __shared__ B tile[kCopyPositions][kChannels];
  const int C = static_cast<int>(C64), W = static_cast<int>(W64), sC = static_cast<int>(sC64);
  const int sH = static_cast<int>(sH64), position_tiles = static_cast<int>(position_tiles64);
  const int HW = static_cast<int>(H64) * W;
  const int n = static_cast<int>(blockIdx.x) / position_tiles;
  const int p0 = (static_cast<int>(blockIdx.x) - n * position_tiles) * kCopyPositions;
  const int c0 = static_cast<int>(blockIdx.y) * kChannels;
  const B* __restrict__ image = reinterpret_cast<const B*>(input) + n * sN + c0 * sC;
  const bool dense = sH == W;  // a position's offset is the position itself
#pragma unroll
  for (int x = threadIdx.x; x < kCopyPositions; x += 32) {  // the positions this thread reads
    const int p = p0 + x;
    if (p < HW) {
      int offset = p;
      if (!dense) {
        const int h = p / W;
        offset = h * sH + (p - h * W);
      }
#pragma unroll
      for (int r = threadIdx.y; r < kChannels; r += kCopyRows) {
        if (c0 + r < C) tile[x][(r + x * kRotation) % kChannels] = image[offset + r * sC];
      }
    }
  }
  __syncthreads();
  const int thread = threadIdx.y * 32 + threadIdx.x;
  const int first = (thread % kVectors) * kVector;  // this thread's channels in the tile
  if (c0 + first >= C) return;
  B* __restrict__ target = reinterpret_cast<B*>(output) + (static_cast<i64>(n) * HW + p0) * C +
                           c0 + first;
  const bool vectors =
      C % kVector == 0 && reinterpret_cast<unsigned long long>(output) % 16u == 0;
  constexpr int kStep = 32 * kCopyRows / kVectors;  // positions a pass of the block
#pragma unroll
  for (int q = thread / kVectors; q < kCopyPositions; q += kStep) {
    if (p0 + q >= HW) break;
    const B* __restrict__ row = tile[q];
    const int turn = first + q * kRotation;
    if (vectors) {
      union {
        roi_vec16 piece;
        B values[kVector];
      } bits;
#pragma unroll
      for (int k = 0; k < kVector; ++k) bits.values[k] = row[(turn + k) % kChannels];
      *reinterpret_cast<roi_vec16*>(target + q * C) = bits.piece;
    } else {
      for (int k = 0; k < kVector && c0 + first + k < C; ++k) {
        target[q * C + k] = row[(turn + k) % kChannels];
      }
    }
  }
}
