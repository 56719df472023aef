// ---- roi_ops_copy_channels_last<T>: an input with a unit W stride, copied channels_last -------
// The staged forward (planning.stages_channels_last) pools a dense channels_last copy of an NCHW
// input with the channel-vector kernels. The copy is a transpose of each image's (C, H * W)
// matrix, moved as bits. A block takes kCopyPositions positions (h * W + w) by 128 bytes of
// channels: it reads rows of positions, one channel a warp instruction (consecutive addresses;
// 16-bit elements two positions a 32-bit load where the planes allow it), into a shared tile kept
// position by position, then each thread gathers 16 bytes of one position's channels from it
// and writes them with one store, eight threads a position (128 consecutive bytes). Each
// position's row of the tile is turned (rotated, CopyTile::turn) so that a warp's accesses on
// both sides fall in distinct banks. Where C or the output's address does not allow 16-byte
// stores, each thread writes its channels one at a time.
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
  // The columns (elements) that position q's row of the tile is turned by. 4- and 8-byte
  // elements: q. 16-bit ones: the row is 32 words of two channels, turned (q / 2 + 2 (q % 2))
  // words; reading two positions of a channel a 32-bit load, lane x writes rows 2x and 2x + 1
  // (turned x and x + 2 words: distinct banks in each store), and a warp gathers four words of
  // each of four positions (turned by distinct residues mod 4: distinct banks).
  static __device__ __forceinline__ int turn(int q) {
    return sizeof(T) == 2 ? 2 * ((q >> 1) + 2 * (q & 1)) : q;
  }
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
  // 16-bit elements two positions a 32-bit load where they share a word of every channel's
  // plane (dense planes of an even size, a 4-byte aligned image): a warp reads 128 bytes an
  // instruction, as it does in float32.
  const bool pairs = sizeof(T) == 2 && dense && HW % 2 == 0 && sC % 2 == 0 && sN % 2 == 0 &&
                     reinterpret_cast<unsigned long long>(input) % 4u == 0;
  if (pairs) {
    const int x = 2 * threadIdx.x;  // positions x and x + 1 of the tile
    if (p0 + x < HW) {  // and p0 + x + 1 (HW is even)
      const unsigned int* __restrict__ words =
          reinterpret_cast<const unsigned int*>(image + p0 + x);
#pragma unroll
      for (int r = threadIdx.y; r < kChannels; r += kCopyRows) {
        if (c0 + r < C) {
          const unsigned int both = words[r * sC / 2];
          tile[x][(r + CopyTile<T>::turn(x)) % kChannels] = static_cast<B>(both);
          tile[x + 1][(r + CopyTile<T>::turn(x + 1)) % kChannels] = static_cast<B>(both >> 16);
        }
      }
    }
  } else {
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
          if (c0 + r < C) {
            tile[x][(r + CopyTile<T>::turn(x)) % kChannels] = image[offset + r * sC];
          }
        }
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
    const int turn = first + CopyTile<T>::turn(q);
    if (sizeof(T) == 2 && vectors) {  // four whole words (turn is even)
      const unsigned int* __restrict__ words = reinterpret_cast<const unsigned int*>(row);
      roi_vec16 piece;
#pragma unroll
      for (int k = 0; k < 4; ++k) piece.w[k] = words[(turn / 2 + k) % (kChannels / 2)];
      *reinterpret_cast<roi_vec16*>(target + q * C) = piece;
    } else if (vectors) {
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
