// ---- roi_pool_forward_cvec<T, R, kArgmax>: channels_last, 16 bytes of channels per load ------
// For inputs whose channel stride is 1 (channels_last) and whose channel vectors are 16-byte
// aligned: the launch plan checks the pointer, C and every stride
// (roi_ops.layout.aligned_channel_vector); other channel-adjacent inputs take the chan kernel. A
// thread keeps CvecShape<T, kArgmax>::kChannels channels (8 float32, 4 float64, 16 or with the
// argmax 8 float16/bfloat16) and one bin at a time, and reads each element of the bin for all
// its channels with one or two 16-byte loads (CvecShape). roi_pool_forward_cvec_wide is the same
// kernel with four vectors (16 channels) a thread in float32 (CvecWideShape): inference on maps
// that fit in L2, forwards with the argmax (planning.cvec_wide), whose tile is dynamic shared
// memory, larger on maps in L2 (planning.cvec_tile_bytes).
// Inference reduces with max.NaN (packed f16x2/bf16x2 for the 16-bit types), the argmax through
// masks (PackedArgmax) where it can, else with the unit kernel's compare and select. Results are
// staged in a shared tile laid out as the
// block's part of the output (channel by channel, bins contiguous: one contiguous run when the
// tile holds every bin, as the launch plan arranges) and copied out in 16-byte pieces: a few
// instructions a piece instead of an output offset and a store for every element.
namespace roi_ops_cuda {
constexpr int kCvecThreads = 8;  // most threads per bin (launch plan: a power of two)
static_assert(kThreads % kCvecThreads == 0, "a block holds whole groups of a bin's threads");
constexpr int kCvecTileBytes = 32768;  // planning.CVEC_TILE_BYTES: one round's outputs
constexpr int kCvecEdges = 128;  // PH + PW up to this: the block caches its bin edges
constexpr int kCvecBlocksPerSM = 4;
// The multi-level kernel: its level's map in registers would spill float64's inference at 64.
template <class T>
struct CvecLevelsBlocksPerSM {
  static constexpr int value = sizeof(T) == 8 ? 3 : kCvecBlocksPerSM;
};

// A 16-byte vector's channels, and the 32-bit (64-bit for float64) shared-memory word that
// holds one channel's result.
template <class T>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int kCount = 4;
  typedef unsigned int Word;
  static __device__ __forceinline__ float get(const roi_vec16& v, int i) {
    return __uint_as_float(v.w[i]);
  }
  static __device__ __forceinline__ Word word(float x) { return __float_as_uint(x); }
  static __device__ __forceinline__ float from_word(Word w) { return __uint_as_float(w); }
};
template <>
struct Lanes<double> {
  static constexpr int kCount = 2;
  typedef unsigned long long Word;
  static __device__ __forceinline__ double get(const roi_vec16& v, int i) {
    const Word bits = static_cast<Word>(v.w[2 * i + 1]) << 32 | v.w[2 * i];
    return __longlong_as_double(static_cast<long long>(bits));
  }
  static __device__ __forceinline__ Word word(double x) {
    return static_cast<Word>(__double_as_longlong(x));
  }
  static __device__ __forceinline__ double from_word(Word w) {
    return __longlong_as_double(static_cast<long long>(w));
  }
};
template <class T>
struct Lanes16 {
  static constexpr int kCount = 8;
  typedef unsigned int Word;
  static __device__ __forceinline__ T get(const roi_vec16& v, int i) {
    T t;
    t.bits = static_cast<unsigned short>(v.w[i >> 1] >> ((i & 1) * 16));
    return t;
  }
  static __device__ __forceinline__ Word word(T x) { return x.bits; }
  static __device__ __forceinline__ T from_word(Word w) {
    T t;
    t.bits = static_cast<unsigned short>(w);
    return t;
  }
};
template <>
struct Lanes<roi_half> : Lanes16<roi_half> {};
template <>
struct Lanes<roi_bf16> : Lanes16<roi_bf16> {};

// max.NaN on a vector's four 32-bit words: two packed float16/bfloat16 channels (max.NaN.f16x2 /
// .bf16x2: each half as the scalar max.NaN), or one float32. Only where NaNMax is enabled.
template <class T>
struct PackedMax;
#ifdef ROI_OPS_MAX_NAN
template <class T>
struct PackedMax {
  static constexpr unsigned int kInfBits = NaNMax<T>::kInfBits;
  static __device__ __forceinline__ unsigned int lowest() {
    return (kInfBits | 0x8000u) * 0x10001u;  // -inf in both halves
  }
  static __device__ __forceinline__ unsigned int max(unsigned int a, unsigned int b) {
    return kInfBits == 0x7c00u ? max_nan_f16x2(a, b) : max_nan_bf16x2(a, b);
  }
  static __device__ __forceinline__ bool exact(const unsigned int (&m)[4], int i) {
    return NaNMax<T>::exact(static_cast<unsigned short>(m[i >> 1] >> ((i & 1) * 16)));
  }
};
template <>
struct PackedMax<float> {
  static __device__ __forceinline__ unsigned int lowest() { return 0xff800000u; }
  static __device__ __forceinline__ unsigned int max(unsigned int a, unsigned int b) {
    return __float_as_uint(max_nan(__uint_as_float(a), __uint_as_float(b)));
  }
  static __device__ __forceinline__ bool exact(const unsigned int (&m)[4], int i) {
    return NaNMax<float>::exact(__uint_as_float(m[i]));
  }
};
#endif

// The vectors a thread reads per element (loop and address work shared by their channels): two
// (8 float32, 4 float64 or 16 16-bit channels), but one for the 16-bit types with the argmax
// (their masks for two vectors spill at 64 registers).
template <class T, bool kArgmax>
struct CvecShape {
  static constexpr int kVectors = sizeof(T) == 2 && kArgmax ? 1 : 2;
  static constexpr int kChannels = kVectors * Lanes<T>::kCount;  // a thread's channels
};
// The wide cvec kernel's: four vectors (16 channels) in float32, where a thread's work per bin
// shared by twice the channels pays (inference on maps read from L2, the argmax:
// planning.cvec_wide); else CvecShape's.
template <class T, bool kArgmax>
struct CvecWideShape {
  static constexpr int kVectors = sizeof(T) == 4 ? 4 : CvecShape<T, kArgmax>::kVectors;
  static constexpr int kChannels = kVectors * Lanes<T>::kCount;
};

// A thread's vectors in memory: vector p at p * stride channels from its first, for p < count
// (the channels that exist); a missing vector re-reads the first (offset 0), its results unused.
// One register: stride (< 256) in the low byte, count above.
struct CvecVectors {
  int bits;
  static __device__ __forceinline__ CvecVectors of(int stride, int count) {
    return {stride | count << 8};
  }
  __device__ __forceinline__ int offset(int p) const {
    return p < count() ? p * stride() : 0;
  }
  __device__ __forceinline__ int stride() const { return bits & 255; }
  __device__ __forceinline__ int count() const { return bits >> 8; }
};

// Where cvec_bin writes a thread's channels: channel c of vector p (c < Lanes<T>::kCount) at
// values[((p * vector_channels) + c) * stride] (indices likewise), as Out (Lanes<T>::Word, or
// the element's own bits).
struct CvecSlots {
  int stride;           // between adjacent channels of a vector
  int vector_channels;  // between a thread's adjacent vectors' first channels
  __device__ __forceinline__ int at(int c, int count) const {
    return ((c / count) * vector_channels + c % count) * stride;
  }
};

// cvec_bin with the argmax through masks (PackedArgmax<T> enabled: float16, bfloat16, one
// vector of eight channels; bins of at most kMaxSide rows and columns): the vector's four words
// of two channels stepped as they are loaded.
template <class T, class Out, class I>
__device__ __forceinline__ void cvec_bin_packed_argmax(const T* __restrict__ corner, I sH, I sW,
                                                       int bin_h, int bin_w, int first_index,
                                                       int w_int, Out* __restrict__ values,
                                                       int* __restrict__ indices,
                                                       CvecSlots slots) {
  typedef PackedArgmax<T> A;
  constexpr int V = Lanes<T>::kCount;
  static_assert(V == 8 && CvecShape<T, true>::kVectors == 1, "16-bit, one vector a thread");
  unsigned int m[4], at[4];  // the words' maxima and positions
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    m[w] = A::lowest();
    at[w] = 0u;  // the first element: where a bin of -inf (raising nothing) has its maximum
  }
  for (int i = 0; i < bin_h; ++i) {
    const T* __restrict__ line = corner + i * sH;
    const unsigned int row = A::row(i);
#pragma unroll 2
    for (int j = 0; j < bin_w; ++j) {
      const roi_vec16 v = load_vec16(line + j * sW);
#pragma unroll
      for (int w = 0; w < 4; ++w) A::step(v.w[w], row + static_cast<unsigned int>(j), m[w], at[w]);
    }
  }
  unsigned int inexact = 0;  // channels whose maximum is a zero or a NaN
#pragma unroll
  for (int c = 0; c < V; ++c) {
    const int shift = (c & 1) * 16;
    const unsigned int bits = (m[c >> 1] >> shift) & 0xffffu;
    const int slot = c * slots.stride;  // slots.at(c, V)
    values[slot] = static_cast<Out>(bits);
    indices[slot] = first_index + A::offset((at[c >> 1] >> shift) & 0xffffu, w_int);
    if (!A::exact(bits)) inexact |= 1u << c;
  }
  // Rare: those take the bin's first element with their key (nothing else is live here).
  while (inexact != 0) {
    const int c = __ffs(inexact) - 1;
    inexact &= inexact - 1;
    Out& value = values[c * slots.stride];
    const int2 ij = first_position_with_key<T>(corner + c, bin_h, bin_w, sH, sW,
                                               Elem<T>::key_of(Lanes<T>::from_word(value)));
    value = static_cast<Out>(Lanes<T>::word(corner[ij.x * sH + ij.y * sW + c]));
    indices[c * slots.stride] = first_index + ij.x * w_int + ij.y;
  }
}

// The argmax of a float32 thread of four vectors (16 channels; the wide kernel) in a bin of at
// most kWideArgmaxSide rows and columns: each channel's position in the bin kept in one byte
// (row << 4 | column), four channels a register, so that 16 channels' maxima and positions fit
// beside the loads at 64 registers.
constexpr int kWideArgmaxSide = 16;
template <class T, class Out, class I>
__device__ __forceinline__ void cvec_bin_wide_argmax(const T* __restrict__ corner,
                                                     CvecVectors vectors, I sH, I sW,
                                                     int bin_h, int bin_w, int first_index,
                                                     int w_int, Out* __restrict__ values,
                                                     int* __restrict__ indices, CvecSlots slots) {
  typedef Lanes<T> L;
  constexpr int V = L::kCount;
  static_assert(sizeof(T) == 4 && V == 4, "float32, four channels a vector");
  int offset[4];  // each vector's channels from the first's (indexed by constants only)
#pragma unroll
  for (int p = 0; p < 4; ++p) offset[p] = vectors.offset(p);
  float best[4 * V];
  unsigned int at[4];  // byte c of at[p]: channel p * V + c's position, row << 4 | column
#pragma unroll
  for (int c = 0; c < 4 * V; ++c) best[c] = Work<float>::lowest();
#pragma unroll
  for (int p = 0; p < 4; ++p) at[p] = 0u;  // the first element (a bin of -inf)
  for (int i = 0; i < bin_h; ++i) {
    const T* __restrict__ line = corner + i * sH;
    const unsigned int row = static_cast<unsigned int>(i) << 4;
#pragma unroll 1
    for (int j = 0; j < bin_w; ++j) {
      const unsigned int position = row | static_cast<unsigned int>(j);
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const roi_vec16 v = load_vec16(line + j * sW + offset[p]);
#pragma unroll
        for (int c = 0; c < V; ++c) {
          const float x = __uint_as_float(v.w[c]);
          if (replaces(x, best[p * V + c])) {
            best[p * V + c] = x;
            at[p] = (at[p] & ~(0xffu << (8 * c))) | (position << (8 * c));
          }
        }
      }
    }
  }
  int slot = 0;
#pragma unroll
  for (int c = 0; c < 4 * V; ++c) {
    const unsigned int a = (at[c / V] >> (8 * (c % V))) & 0xffu;
    if (c % V == 0) slot = (c / V) * slots.vector_channels * slots.stride;
    values[slot] = static_cast<Out>(L::word(best[c]));
    indices[slot] = first_index + static_cast<int>(a >> 4) * w_int + static_cast<int>(a & 15u);
    slot += slots.stride;
  }
}

// The side of the squares a bin of h x w elements reads from the tables of maxima
// (max_tables.cu): 4 (4 x 4 table), 2 (2 x 2) or 1 (the map).
__device__ __forceinline__ int table_side(int h, int w) {
  return h >= 4 && w >= 4 ? 4 : h >= 2 && w >= 2 ? 2 : 1;
}

// One bin (corner: its first element of the thread's first channel; not empty; sH and sW
// i64, or int where every offset within an image fits) for the thread's channels: every element
// read once, as kVectors 16-byte vectors (`vectors`), in the contract's scan order. Writes each
// channel's value and, with kArgmax, its argmax, at `slots`. Inference with tables of maxima
// (max_tables.cu; table2, table4: the tables' distance from the map in elements, 0 for none)
// reads the table that the bin's sides allow instead, every element of the bin covered by the
// squares read, each square inside the bin.
template <class T, bool kArgmax, int P, class Out, class I>
__device__ __forceinline__ void cvec_bin(const T* __restrict__ corner, CvecVectors vectors, I sH,
                                         I sW, int bin_h, int bin_w, int first_index, int w_int,
                                         Out* __restrict__ values, int* __restrict__ indices,
                                         CvecSlots slots, i64 table2 = 0, i64 table4 = 0) {
  typedef Lanes<T> L;
  constexpr int V = L::kCount;
  constexpr int kChannels = P * V;
  int offset[P];  // each vector's channels from the first's (indexed by constants only)
#pragma unroll
  for (int p = 0; p < P; ++p) offset[p] = vectors.offset(p);
  if constexpr (!kArgmax && NaNMax<T>::kEnabled) {
    // Two elements unrolled, but one for four vectors (their loads spill at 64 registers).
    constexpr int kInferUnroll = P == 4 ? 1 : 2;
    (void)kInferUnroll;  // read by #pragma unroll only (a host build ignores the pragma)
    unsigned int m[P][4];  // P vectors of four words of maxima (max.NaN(-inf, v) is v)
#pragma unroll
    for (int p = 0; p < P; ++p) {
#pragma unroll
      for (int w = 0; w < 4; ++w) m[p][w] = PackedMax<T>::lowest();
    }
    const int s = table2 == 0 ? 1 : table_side(bin_h, bin_w);
    const T* __restrict__ table = corner + (s == 4 ? table4 : s == 2 ? table2 : 0);
    for (int i0 = 0; i0 < bin_h; i0 += s) {
      const T* __restrict__ line = table + (i0 < bin_h - s ? i0 : bin_h - s) * sH;
#pragma unroll kInferUnroll
      for (int j0 = 0; j0 < bin_w; j0 += s) {
        const int j = j0 < bin_w - s ? j0 : bin_w - s;
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const roi_vec16 v = load_vec16(line + j * sW + offset[p]);
#pragma unroll
          for (int w = 0; w < 4; ++w) m[p][w] = PackedMax<T>::max(m[p][w], v.w[w]);
        }
      }
    }
    unsigned int inexact = 0;  // channels whose maximum is a zero or a NaN
    // The slots in order, as slots.at(c, V) gives them.
    int slot = 0;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      roi_vec16 result;
#pragma unroll
      for (int w = 0; w < 4; ++w) result.w[w] = m[p][w];
      slot = p * slots.vector_channels * slots.stride;
#pragma unroll
      for (int c = 0; c < V; ++c) {
        values[slot] = static_cast<Out>(L::word(L::get(result, c)));
        slot += slots.stride;
        if (!PackedMax<T>::exact(m[p], c)) inexact |= 1u << (p * V + c);
      }
    }
    // Rare: those take the bin's first element with their key (nothing else is live here).
    while (inexact != 0) {
      const int c = __ffs(inexact) - 1;
      inexact &= inexact - 1;
      Out& slot = values[slots.at(c, V)];
      const T value = first_with_key<T>(corner + vectors.offset(c / V) + c % V, bin_h, bin_w, sH,
                                        sW, Elem<T>::key_of(L::from_word(slot)));
      slot = static_cast<Out>(L::word(value));
    }
  } else {
    if constexpr (kArgmax && P == 4) {  // float32 (CvecWideShape)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
      constexpr bool kBytePositions = false;  // they spill at 64 registers on sm_80
#else
      constexpr bool kBytePositions = true;
#endif
      if (kBytePositions && bin_h <= kWideArgmaxSide && bin_w <= kWideArgmaxSide) {
        cvec_bin_wide_argmax<T>(corner, vectors, sH, sW, bin_h, bin_w, first_index, w_int, values,
                                indices, slots);
      } else {  // larger bins (and sm_80): two vectors at a time, as the cvec kernel
#pragma unroll 1
        for (int half = 0; half < 2; ++half) {
          const int count = vectors.count() - 2 * half;
          const int shift = 2 * half * slots.vector_channels * slots.stride;
          cvec_bin<T, true, 2>(corner + vectors.offset(2 * half),
                               CvecVectors::of(vectors.stride(), count > 0 ? count : 0), sH, sW,
                               bin_h, bin_w, first_index, w_int, values + shift, indices + shift,
                               slots);
        }
      }
      return;
    }
    if constexpr (kArgmax && PackedArgmax<T>::kEnabled) {
      if (bin_h <= PackedArgmax<T>::kMaxSide && bin_w <= PackedArgmax<T>::kMaxSide) {
        cvec_bin_packed_argmax<T>(corner, sH, sW, bin_h, bin_w, first_index, w_int, values,
                                  indices, slots);
        return;
      }
    }
    typedef typename Work<T>::V WV;
    // Unrolling two elements spills float32's and float64's 8 and 4 channels (64 registers);
    // float16 and bfloat16 measured faster with it.
    constexpr int kUnroll = P == 1 ? 2 : 1;
    (void)kUnroll;  // read by #pragma unroll only (a host build ignores the pragma)
    WV best[kChannels];
    int at[kChannels];
#pragma unroll
    for (int c = 0; c < kChannels; ++c) {
      best[c] = Work<T>::lowest();
      at[c] = 0;
    }
    int row = 0;  // i * W: the argmax offset of the current row
    for (int i = 0; i < bin_h; ++i) {
      const T* __restrict__ line = corner + i * sH;
#pragma unroll kUnroll
      for (int j = 0; j < bin_w; ++j) {
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const roi_vec16 v = load_vec16(line + j * sW + offset[p]);
#pragma unroll
          for (int c = 0; c < V; ++c) {
            const WV x = Work<T>::in(L::get(v, c));
            if (replaces(x, best[p * V + c])) {
              best[p * V + c] = x;
              at[p * V + c] = row + j;
            }
          }
        }
      }
      row += w_int;
    }
    // The slots in order, as slots.at(c, V) gives them.
    int slot = 0;
#pragma unroll
    for (int c = 0; c < kChannels; ++c) {
      T value = Work<T>::out(best[c]);
      if (!Work<T>::kKeepsNaN && !(best[c] == best[c])) {  // the NaN's payload was lost:
        const int i = at[c] / w_int;                        // re-read the winner
        value = corner[i * sH + (at[c] - i * w_int) * sW + offset[c / V] + c % V];
      }
      if (c % V == 0) slot = (c / V) * slots.vector_channels * slots.stride;
      values[slot] = static_cast<Out>(L::word(value));
      if constexpr (kArgmax) indices[slot] = first_index + at[c];
      slot += slots.stride;
    }
  }
}

// An element's bits as the unsigned type of its size: what the cvec kernel's tile holds (its
// outputs exactly as they are stored) and what the channels_last copy moves.
template <int kBytes>
struct TileBits;
template <>
struct TileBits<2> {
  typedef unsigned short type;
};
template <>
struct TileBits<4> {
  typedef unsigned int type;
};
template <>
struct TileBits<8> {
  typedef unsigned long long type;
};

// Copies tile[0, count) to out[0, count) (slots of the elements' own size, or 16-bit elements
// in 32-bit slots): in 16-byte pieces of `out` when it is 16-byte aligned (the tile is), else
// one element at a time.
template <class Slot, class S>
__device__ __forceinline__ void copy_tile_out(const Slot* __restrict__ tile, int count,
                                              S* __restrict__ out, int tid) {
  constexpr int kVec = 16 / sizeof(S);
  if (reinterpret_cast<unsigned long long>(out) % 16u != 0) {
    for (int i = tid; i < count; i += kThreads) store_streaming(out + i, static_cast<S>(tile[i]));
    return;
  }
  const int pieces = count / kVec;
  for (int j = tid; j < pieces; j += kThreads) {
    const roi_vec16* from = reinterpret_cast<const roi_vec16*>(tile + j * kVec);
    roi_vec16 piece = from[0];
    if constexpr (sizeof(Slot) != sizeof(S)) {  // two pieces of slots: their low halves
      const roi_vec16 low = piece, high = from[1];
#pragma unroll
      for (int w = 0; w < 2; ++w) {
        piece.w[w] = (low.w[2 * w] & 0xffffu) | (low.w[2 * w + 1] << 16);
        piece.w[w + 2] = (high.w[2 * w] & 0xffffu) | (high.w[2 * w + 1] << 16);
      }
    }
    store_streaming(reinterpret_cast<roi_vec16*>(out + j * kVec), piece);
  }
  const int i = pieces * kVec + tid;  // the last piece's elements, if partial
  if (i < count) store_streaming(out + i, static_cast<S>(tile[i]));
}

// The bins of one round of a cvec block of `lanes` threads a bin (channels_per_block /
// kChannels): every bin when the block's outputs fit the tile's `capacity` (the launch plan
// sees to it wherever one channel vector's bins fit), so that the round's outputs are one
// contiguous run of the output; else as many as fit.
template <int kChannels>
__device__ __forceinline__ int cvec_round_bins(int lanes, int nb, int capacity) {
  return lanes * kChannels * nb <= capacity ? nb : capacity / (lanes * kChannels);
}

// The cvec kernel's work in block (k, channel blocks) of ROI k on one map (input, its sizes and
// strides, spatial_scale; sC is 1). num_images: N, or 0 for a ROI that pools nothing (every
// bin empty); table2, table4: as cvec_bin's. Every thread of the block runs it (it has
// barriers).
//
// A round pools the block's channels (channels_per_block = lanes * kChannels, fewer at the end)
// for `bins` bins into a shared tile laid out as the output (channel by channel, bins
// contiguous), then copies the tile out, in 16-byte pieces when the round has every bin. Lane l
// of a bin holds channels l * kCount, ... and (two or four vectors) each next `lanes * kCount`
// channels on, so that a warp's first vectors are adjacent.
template <class T, class R, bool kArgmax, int P, bool kDynamicTile = false>
__device__ __forceinline__ void cvec_roi(const T* __restrict__ input, const i64 num_images,
                                         const i64 C, const i64 H, const i64 W, const i64 sN,
                                         const i64 sH, const i64 sW, const R* __restrict__ row,
                                         const i64 rs1, const double spatial_scale, const i64 PH,
                                         const i64 PW, const i64 channels_per_block,
                                         T* __restrict__ output, int* __restrict__ argmax,
                                         const i64 k, const i64 table2 = 0,
                                         const i64 table4 = 0) {
  typedef typename Rois<R>::G G;
  typedef typename TileBits<sizeof(T)>::type S;
  // A value's slot in the tile: its own bits, or with the argmax a 16-bit value in a 32-bit
  // slot, so that a value and its argmax sit at the same offset of their parts.
  typedef typename TileBits<kArgmax && sizeof(T) == 2 ? 4 : sizeof(T)>::type Slot;
  constexpr int V = Lanes<T>::kCount;
  constexpr int kChannels = P * V;
  // The tile: values, then (kArgmax) as many argmax entries, each part a whole number of
  // 16-byte pieces; an output's value and argmax at the same index of their parts.
  // kDynamicTile: the tile is the launch's dynamic shared memory, of the size the launch plan
  // gives (planning.cvec_tile_bytes), else a static kCvecTileBytes.
  roi_vec16* tile = reinterpret_cast<roi_vec16*>(roi_dynamic_shared);  // 16-byte pieces
  if constexpr (!kDynamicTile) {
    __shared__ roi_vec16 static_tile[kCvecTileBytes / 16];
    tile = static_tile;
  }
  const unsigned int tile_bytes = kDynamicTile ? dynamic_shared_bytes() : kCvecTileBytes;
  const int capacity = static_cast<int>(tile_bytes / (sizeof(Slot) + (kArgmax ? 4 : 0))) / 8 * 8;
  __shared__ int2 edges[kCvecEdges];
  Slot* const tile_value = reinterpret_cast<Slot*>(tile);
  int* const tile_index = reinterpret_cast<int*>(tile_value + capacity);
  const int tid = threadIdx.x;
  const RoiGeometry<G> g = roi_geometry<R>(row, rs1, num_images, spatial_scale, PH, PW);
  const bool valid = g.batch >= 0;
  const bool cached = PH + PW <= kCvecEdges;  // the same for the whole block
  if (cached) fill_edge_cache<G>(edges, g, PH, PW, H, W, tid);
  const int nb = static_cast<int>(PH * PW);  // < 2^31 - 256 (launcher checks)
  const int pw_count = static_cast<int>(PW);
  const int w_int = static_cast<int>(W);  // H * W < 2^31 (checked by roi_ops)
  // Offsets within an image: < 2^31 (the launch plan checks it for this kernel).
  const int sH_int = static_cast<int>(sH), sW_int = static_cast<int>(sW);
  const int lanes = static_cast<int>(channels_per_block) / kChannels;  // a power of two
  const int round_bins = cvec_round_bins<kChannels>(lanes, nb, capacity);
  const int lane_bits = __ffs(lanes) - 1;
  const int lane = tid & (lanes - 1);
  const int first_bin = tid >> lane_bits;
  const int bin_step = kThreads >> lane_bits;
  const T* __restrict__ image = input + (valid ? g.batch : 0) * sN;
  for (i64 c0 = static_cast<i64>(blockIdx.y) * channels_per_block; c0 < C;
       c0 += static_cast<i64>(gridDim.y) * channels_per_block) {
    const int channels =
        static_cast<int>(C - c0 < channels_per_block ? C - c0 : channels_per_block);
    // The thread's vectors exist below `vectors` (C is a multiple of V): compared with the
    // lane against block-wide counts.
    const int vectors = channels / V;
    const bool has_vector = lane < vectors;
    // The thread's vectors that exist (lane + p * lanes < vectors); for two, written as a
    // compare, which kept float64's inference at 64 registers without spilling.
    const int present =
        P <= 2 ? 1 + (lane < vectors - lanes) : (vectors - lane + lanes - 1) >> lane_bits;
    const CvecVectors thread_vectors = CvecVectors::of(V * lanes, present);
    const T* __restrict__ planes = image + c0 + lane * V;
    // One round: bins q0 .. q0 + bins - 1 of the block's channels.
    const auto round = [&](const int q0, const int bins) {
      const CvecSlots slots = {bins, V * lanes};  // the tile: bins contiguous
      const int lane_slot = lane * V * bins;
      if (has_vector) {
        for (int qi = first_bin; qi < bins; qi += bin_step) {
          const int q = q0 + qi;
          const int ph = q / pw_count;
          const int pw = q - ph * pw_count;
          const int2 rows = row_span<G>(edges, g, cached, ph, H);
          const int2 cols = col_span<G>(edges, g, cached, PH, pw, W);
          const int bin_h = rows.y - rows.x;
          const int bin_w = cols.y - cols.x;
          Slot* __restrict__ values = tile_value + lane_slot + qi;
          int* __restrict__ indices = tile_index + lane_slot + qi;
          if (bin_h <= 0 || bin_w <= 0) {
            int slot = 0;
#pragma unroll
            for (int c = 0; c < kChannels; ++c) {
              if (c % V == 0) slot = (c / V) * slots.vector_channels * slots.stride;
              values[slot] =
                  static_cast<Slot>(Lanes<T>::word(Work<T>::out(typename Work<T>::V(0))));
              if constexpr (kArgmax) indices[slot] = -1;
              slot += slots.stride;
            }
          } else {
            cvec_bin<T, kArgmax, P>(planes + (rows.x * sH_int + cols.x * sW_int), thread_vectors,
                                 sH_int, sW_int, bin_h, bin_w, rows.x * w_int + cols.x, w_int,
                                 values, indices, slots, table2, table4);
          }
        }
      }
      __syncthreads();
      const i64 out0 = (k * C + c0) * nb;
      if (bins == nb) {
        copy_tile_out<Slot, S>(tile_value, channels * nb, reinterpret_cast<S*>(output + out0),
                               tid);
        if constexpr (kArgmax) {
          copy_tile_out<unsigned int, unsigned int>(
              reinterpret_cast<const unsigned int*>(tile_index), channels * nb,
              reinterpret_cast<unsigned int*>(argmax + out0), tid);
        }
      } else {  // a round of some bins of each channel: one run of `bins` outputs a channel
        for (int e = tid; e < channels * bins; e += kThreads) {
          const int cl = e / bins;
          const i64 o = out0 + static_cast<i64>(cl) * nb + q0 + (e - cl * bins);
          store_streaming(reinterpret_cast<S*>(output) + o, static_cast<S>(tile_value[e]));
          if constexpr (kArgmax) store_streaming(reinterpret_cast<unsigned int*>(argmax) + o,
                                                 static_cast<unsigned int>(tile_index[e]));
        }
      }
      __syncthreads();
    };
    if (round_bins == nb) {  // the usual case: one round, every bin
      round(0, nb);
    } else {
      for (int q0 = 0; q0 < nb; q0 += round_bins) {
        round(q0, nb - q0 < round_bins ? nb - q0 : round_bins);
      }
    }
  }
}
}  // namespace roi_ops_cuda

namespace roi_ops_cuda {
// The bodies of the cvec kernels (single map and levels) with P vectors a thread.
// tables, table_decision: max_tables.cu's (null: none), read in inference where
// table_decision[0] is 1.
template <class T, class R, bool kArgmax, int P, bool kDynamicTile = false>
__device__ __forceinline__ void cvec_map_kernel(ROI_OPS_MAP_PARAMETERS,
                                                const i64 channels_per_block,
                                                const T* __restrict__ tables,
                                                const int* __restrict__ table_decision,
                                                ROI_OPS_FORWARD_OUTPUTS) {
  (void)sC;  // 1
  const i64 k = blockIdx.x;
  i64 table2 = 0, table4 = 0;
  if constexpr (!kArgmax && NaNMax<T>::kEnabled) {
    if (tables != nullptr && table_decision[0] != 0) {
      // The tables' distance from the map (another allocation of the same address space).
      table2 = static_cast<i64>(reinterpret_cast<unsigned long long>(tables) -
                                reinterpret_cast<unsigned long long>(input)) /
               static_cast<i64>(sizeof(T));
      table4 = table2 + N * sN;
    }
  }
  cvec_roi<T, R, kArgmax, P, kDynamicTile>(input, N, C, H, W, sN, sH, sW, rois + k * rs0, rs1,
                                           spatial_scale, PH, PW, channels_per_block, output,
                                           argmax, k, table2, table4);
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}
template <class T, class R, bool kArgmax, int P>
__device__ __forceinline__ void cvec_levels_kernel(ROI_OPS_LEVELS_PARAMETERS,
                                                   const i64 channels_per_block,
                                                   ROI_OPS_FORWARD_OUTPUTS) {
  const i64 k = blockIdx.x;
  const int level = roi_level(levels, ls0, k, L);
  const LevelMap<T>& map = maps.level[level < 0 ? 0 : level];
  cvec_roi<T, R, kArgmax, P>(map.input, level < 0 ? 0 : N, C, map.H, map.W, map.sN, map.sH,
                             map.sW, rois + k * rs0, rs1, map.spatial_scale, PH, PW,
                             channels_per_block, output, argmax, k);
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}
}  // namespace roi_ops_cuda

// channels_per_block: CvecShape<T, kArgmax>::kChannels (the wide kernel: CvecWideShape's) times
// a power of two <= kCvecThreads (threads per bin); C a multiple of Lanes<T>::kCount; the input
// pointer and sN, sH, sW 16-byte aligned (sC == 1). tables, table_decision: null, or (inference,
// the map dense channels_last) max_tables.cu's tables of this map and the decision to read them.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kCvecBlocksPerSM)
    roi_pool_forward_cvec(ROI_OPS_MAP_PARAMETERS, const i64 channels_per_block,
                          const T* __restrict__ tables, const int* __restrict__ table_decision,
                          ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  cvec_map_kernel<T, R, kArgmax, CvecShape<T, kArgmax>::kVectors>(
      input, N, C, H, W, sN, sC, sH, sW, rois, rs0, rs1, spatial_scale, PH, PW,
      channels_per_block, tables, table_decision, output, argmax, bad_roi_log);
}

// ---- roi_pool_forward_cvec_wide<T, R, kArgmax>: the cvec kernel, four vectors a thread in
// float32 (CvecWideShape); arguments as the cvec kernel's.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kCvecBlocksPerSM)
    roi_pool_forward_cvec_wide(ROI_OPS_MAP_PARAMETERS, const i64 channels_per_block,
                               const T* __restrict__ tables,
                               const int* __restrict__ table_decision, ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  // float32 with the argmax (planning.cvec_dynamic_tile): the tile in dynamic shared memory,
  // larger than the static one on maps in L2 where four blocks of it fit an SM, so that
  // 16-channel threads keep eight lanes a bin (7x7 bins).
  constexpr bool kDynamicTile = kArgmax && sizeof(T) == 4;
  cvec_map_kernel<T, R, kArgmax, CvecWideShape<T, kArgmax>::kVectors, kDynamicTile>(
      input, N, C, H, W, sN, sC, sH, sW, rois, rs0, rs1, spatial_scale, PH, PW,
      channels_per_block, tables, table_decision, output, argmax, bad_roi_log);
}

// ---- roi_pool_forward_cvec_levels<T, R, kArgmax>: the cvec kernel over pyramid levels --------
// Block (k, channel blocks) pools ROI k from the map of its level (common.cuh: LevelMaps); a ROI
// with no level pools nothing. Every level is one the cvec kernel can read. Arguments: the L
// maps, the (K,) int64 levels (row stride ls0), then as the cvec kernel's without the map's.
// roi_pool_forward_cvec_wide_levels: likewise with CvecWideShape.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads,
                                  roi_ops_cuda::CvecLevelsBlocksPerSM<T>::value)
    roi_pool_forward_cvec_levels(ROI_OPS_LEVELS_PARAMETERS, const i64 channels_per_block,
                                 ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  cvec_levels_kernel<T, R, kArgmax, CvecShape<T, kArgmax>::kVectors>(
      maps, L, levels, ls0, N, C, rois, rs0, rs1, PH, PW, channels_per_block, output, argmax,
      bad_roi_log);
}
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads,
                                  roi_ops_cuda::CvecLevelsBlocksPerSM<T>::value)
    roi_pool_forward_cvec_wide_levels(ROI_OPS_LEVELS_PARAMETERS, const i64 channels_per_block,
                                      ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  // Two vectors with the argmax: four spill beside the table of levels at 64 registers.
  constexpr int P =
      kArgmax ? CvecShape<T, kArgmax>::kVectors : CvecWideShape<T, kArgmax>::kVectors;
  cvec_levels_kernel<T, R, kArgmax, P>(
      maps, L, levels, ls0, N, C, rois, rs0, rs1, PH, PW, channels_per_block, output, argmax,
      bad_roi_log);
}
