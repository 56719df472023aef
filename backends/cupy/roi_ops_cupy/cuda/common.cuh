// RoI max pooling (the Fast R-CNN op) for roi_ops, exact to docs/contract.md: what every kernel
// family shares.
//
// roi_ops_cupy/kernels.py joins this header and one file per kernel family (forward_*.cu,
// backward_*.cu) into one NVRTC source, compiled once per device and dtype pair; every shape is a
// run-time argument. Nothing includes a header, so NVRTC needs no CUDA include path: float16 and
// bfloat16 are handled as their bit patterns (roi_half, roi_bf16) with PTX conversions, which
// avoids mixing CuPy's bundled cuda_fp16.h with a toolkit's cuda_bf16.h of another version.
//
// Build flags: --fmad=false (CuPy adds -ftz=true). The geometry uses the _rn intrinsics anyway,
// so no contraction into FMA can change a rounding, and it meets no subnormal that could change
// an integral result; reductions compare integer keys or use PTX without .ftz, so flushing
// cannot touch them.
//
// tools/host_emulator.cpp compiles the same source as host C++ for tests without a GPU: it
// supplies host versions of the PTX primitives below (the one ROI_OPS_HOST_EMULATION block).
//
typedef long long i64;

// Forward entry points: a map group (one map, or the pyramid's level table and levels), the
// kernel's work split, the outputs; in planning.py's argument order (launch.py finds them by name).
#define ROI_OPS_MAP_PARAMETERS                                                                  \
  const T *__restrict__ input, const i64 N, const i64 C, const i64 H, const i64 W, const i64 sN, \
      const i64 sC, const i64 sH, const i64 sW, const R *__restrict__ rois, const i64 rs0,       \
      const i64 rs1, const double spatial_scale, const i64 PH, const i64 PW
#define ROI_OPS_LEVELS_PARAMETERS                                                                \
  const roi_ops_cuda::LevelMaps<T> maps, const i64 L, const i64 *__restrict__ levels,            \
      const i64 ls0, const i64 N, const i64 C, const R *__restrict__ rois, const i64 rs0,        \
      const i64 rs1, const i64 PH, const i64 PW
#define ROI_OPS_FORWARD_OUTPUTS \
  T *__restrict__ output, int *__restrict__ argmax, long long *__restrict__ bad_roi_log

struct roi_half {
  unsigned short bits;
};
struct roi_bf16 {
  unsigned short bits;
};

namespace roi_ops_cuda {

// ---- PTX primitives (the host emulator defines the same names) -------------------------------
#ifndef ROI_OPS_HOST_EMULATION
__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// Whether v replaces best as the first maximal element so far: v > best, or v is NaN; never once
// best is NaN (the first NaN wins). -0 == +0, so the earlier zero stays. PTX without .ftz:
// CuPy compiles with -ftz=true, under which C++ float comparisons flush subnormals to zero.
__device__ __forceinline__ bool replaces(float v, float best) {
  unsigned int r;
  asm("{\n\t.reg .pred p;\n\tsetp.gtu.f32 p, %1, %2;\n\tsetp.num.and.f32 p, %2, %2, p;\n\t"
      "selp.u32 %0, 1, 0, p;\n\t}"
      : "=r"(r)
      : "f"(v), "f"(best));
  return r != 0;
}

// Stores of results nobody reads in the kernel: evict-first (st.global.cs), so that they do not
// push the input out of L2.
__device__ __forceinline__ void store_streaming(unsigned short* a, unsigned short v) {
  asm volatile("st.global.cs.b16 [%0], %1;" ::"l"(a), "h"(v) : "memory");
}
__device__ __forceinline__ void store_streaming(unsigned int* a, unsigned int v) {
  asm volatile("st.global.cs.b32 [%0], %1;" ::"l"(a), "r"(v) : "memory");
}
__device__ __forceinline__ void store_streaming(unsigned long long* a, unsigned long long v) {
  asm volatile("st.global.cs.b64 [%0], %1;" ::"l"(a), "l"(v) : "memory");
}
struct __align__(16) roi_vec16 { unsigned int w[4]; };
__device__ __forceinline__ roi_vec16 load_vec16(const void* __restrict__ address) {
  return *static_cast<const roi_vec16*>(address);
}
__device__ __forceinline__ void store_streaming(roi_vec16* a, const roi_vec16& v) {
  asm volatile("st.global.cs.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(a), "r"(v.w[0]), "r"(v.w[1]),
               "r"(v.w[2]), "r"(v.w[3]) : "memory");
}

// max.NaN (sm_80+): NaN-propagating, no .ftz; returns one of its operands unless the result is a
// zero (either sign may come back) or a NaN (canonical, payload lost). The packed forms take two
// float16/bfloat16 values per 32-bit word.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ROI_OPS_MAX_NAN 1
// One max.NaN instruction on operands of register class `reg` (asm takes only literal text).
#define ROI_OPS_MAX_NAN_PTX(name, type, suffix, reg)                           \
  __device__ __forceinline__ type name(type a, type b) {                        \
    type d;                                                                     \
    asm("max.NaN." suffix " %0, %1, %2;" : "=" reg(d) : reg(a), reg(b));        \
    return d;                                                                   \
  }
ROI_OPS_MAX_NAN_PTX(max_nan, float, "f32", "f")
ROI_OPS_MAX_NAN_PTX(max_nan_f16, unsigned short, "f16", "h")
ROI_OPS_MAX_NAN_PTX(max_nan_bf16, unsigned short, "bf16", "h")
ROI_OPS_MAX_NAN_PTX(max_nan_f16x2, unsigned int, "f16x2", "r")
ROI_OPS_MAX_NAN_PTX(max_nan_bf16x2, unsigned int, "bf16x2", "r")
#undef ROI_OPS_MAX_NAN_PTX
// set.gt on two packed float16 (bfloat16: sm_90+) values: 0xffff in each half where a > b,
// ordered (0 where either is a NaN), no .ftz.
__device__ __forceinline__ unsigned int gt_mask_f16x2(unsigned int a, unsigned int b) {
  unsigned int d;
  asm("set.gt.u32.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
#if __CUDA_ARCH__ >= 900
#define ROI_OPS_GT_MASK_BF16X2 1
__device__ __forceinline__ unsigned int gt_mask_bf16x2(unsigned int a, unsigned int b) {
  unsigned int d;
  asm("set.gt.u32.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
#endif
#endif

// Whether this thread is thread (0, 0) of a block in grid row 0, and its block's blockIdx.x,
// read afresh from the special registers: the optimiser cannot keep the kernel's own earlier
// reads of them (or what it computed from them) live until here.
__device__ __forceinline__ bool first_thread_of_row_0() {
  unsigned int x, y, row;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(x));
  asm volatile("mov.u32 %0, %%tid.y;" : "=r"(y));
  asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(row));
  return (x | y | row) == 0u;
}
__device__ __forceinline__ i64 block_column() {
  unsigned int x;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(x));
  return x;
}

// Every kernel's dynamic shared memory (the launch plan sizes it), and its size in bytes.
extern __shared__ __align__(16) unsigned char roi_dynamic_shared[];
__device__ __forceinline__ unsigned int dynamic_shared_bytes() {
  unsigned int bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
  return bytes;
}
#endif  // ROI_OPS_HOST_EMULATION

// ---- Shared constants and small helpers -------------------------------------------------------

constexpr i64 kIndexLimit = 1099511627776LL;  // 2^40, the contract's index() saturation
constexpr int kThreads = 256;                  // the forward kernels' (largest) block
// Blocks per SM in the launch bounds of the plane, chan and atomic backward kernels: every one
// fits in 48 registers without spills on sm_80 and sm_90 (6 blocks spilled the chan kernel;
// unconstrained, ptxas spilled on sm_80).
constexpr int kBlocksPerSM = 5;

// Round to nearest even; NaN becomes the canonical 0x7fff (what cvt.rn.bf16.f32 gives).
__device__ __forceinline__ unsigned short float_to_bf16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned short b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
  return b;
#else
  const unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

__device__ __forceinline__ float bf16_to_float(unsigned short b) {
  return __uint_as_float(static_cast<unsigned int>(b) << 16);
}

template <class A>
__device__ __forceinline__ A clamp_to(A v, A lo, A hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// ---- Reduction view of an element: an integer order key, and its value for the backward ----
// Keys are compared as integers, not floats: CuPy always compiles with -ftz=true, under which
// float comparisons treat subnormals as zero. The key of a float is its sign-magnitude bits as
// a two's complement integer, so -0 and +0 are equal, and every NaN gets the largest key, above
// +inf: the first element with the largest key is the contract's first maximal element.

template <class T>
struct Elem;
template <>
struct Elem<float> {
  typedef int key;
  static __device__ __forceinline__ int key_of(float v) {
    const int bits = __float_as_int(v);
    const int magnitude = bits & 0x7fffffff;
    return magnitude > 0x7f800000 ? 0x7fffffff : (bits < 0 ? -magnitude : magnitude);
  }
  static __device__ __forceinline__ float value_of(float v) { return v; }
};
template <>
struct Elem<double> {
  typedef i64 key;
  static __device__ __forceinline__ i64 key_of(double v) {
    const i64 bits = __double_as_longlong(v);
    const i64 magnitude = bits & 0x7fffffffffffffffLL;
    return magnitude > 0x7ff0000000000000LL ? 0x7fffffffffffffffLL
                                             : (bits < 0 ? -magnitude : magnitude);
  }
  static __device__ __forceinline__ double value_of(double v) { return v; }
};
// float16 and bfloat16: the same on their 16 bits; kInfBits is the type's +inf pattern.
template <class T, int kInfBits>
struct Elem16 {
  typedef int key;
  static __device__ __forceinline__ int key_of(T v) {
    const int magnitude = v.bits & 0x7fff;
    return magnitude > kInfBits ? 0x7fff : ((v.bits & 0x8000) ? -magnitude : magnitude);
  }
  static __device__ __forceinline__ float value_of(T v) {
    return kInfBits == 0x7c00 ? half_to_float(v.bits) : bf16_to_float(v.bits);
  }
};
template <>
struct Elem<roi_half> : Elem16<roi_half, 0x7c00> {};
template <>
struct Elem<roi_bf16> : Elem16<roi_bf16, 0x7f80> {};

template <class T>
struct BinMax {
  T value;
  int index;  // h * W + w, or -1 for an empty bin
};

// The first maximal element of one bin in row-major scan order; NaN is maximal (first NaN wins),
// -inf is ordinary, -0 equals +0. An empty bin gives +0 and -1. The value is copied, never
// converted.
template <class T>
__device__ __forceinline__ BinMax<T> bin_max(const T* __restrict__ plane, int2 rows, int2 cols,
                                             i64 sH, i64 sW, i64 W) {
  typedef typename Elem<T>::key K;
  BinMax<T> m;
  m.value = T();
  m.index = -1;
  K best = 0;
  for (int h = rows.x; h < rows.y; ++h) {
    const T* __restrict__ line = plane + h * sH;
    const int base = h * static_cast<int>(W);  // < H * W < 2^31 (checked by roi_ops)
#pragma unroll 4
    for (int w = cols.x; w < cols.y; ++w) {
      const T v = line[w * sW];
      const K key = Elem<T>::key_of(v);
      if (m.index < 0 || key > best) {
        best = key;
        m.value = v;
        m.index = base + w;
      }
    }
  }
  return m;
}

// A walk through a block's outputs in memory order (ROI r, channel c, bin q, the bin fastest)
// from output `first` in steps of `step` outputs: the position is counted with carries, so the
// walk's loop has no division. Every step component is below its radix, so one carry each
// suffices.
struct OutputWalk {
  unsigned int r, c, q;                 // where the walk is
  unsigned int step_r, step_c, step_q;  // the step in the same radices
  unsigned int channels, bins;
  __device__ __forceinline__ OutputWalk(unsigned int first, unsigned int step,
                                        unsigned int channel_count, unsigned int bin_count) {
    channels = channel_count;
    bins = bin_count;
    const unsigned int per_roi = channels * bins;
    step_r = step / per_roi;
    step_c = (step % per_roi) / bins;
    step_q = (step % per_roi) % bins;
    r = first / per_roi;
    c = (first % per_roi) / bins;
    q = (first % per_roi) % bins;
  }
  __device__ __forceinline__ void advance() {
    q += step_q;
    c += step_c;
    r += step_r;
    if (q >= bins) {
      q -= bins;
      ++c;
    }
    if (c >= channels) {
      c -= channels;
      ++r;
    }
  }
};

// The plane layout: which bins a thread owns and which channels of a block it visits. The
// launch plan sizes the block to whole groups (rounded up to a warp) when nb <= 256.
struct PlaneLayout {
  unsigned int bins;    // nb = PH * PW
  unsigned int groups;  // threads own bins in `groups` groups of nb (nb <= threads), else 1
  unsigned int threads;
  unsigned int first_bin, first_channel;
  bool active;  // false for the threads left over after the last whole group
  __device__ __forceinline__ PlaneLayout(i64 PH, i64 PW, unsigned int tid, unsigned int count) {
    bins = static_cast<unsigned int>(PH * PW);  // < 2^31 - 256 (checked by the backend)
    threads = count;
    groups = bins <= threads ? threads / bins : 1;
    first_bin = groups > 1 ? tid % bins : tid;
    first_channel = groups > 1 ? tid / bins : 0;
    active = first_channel < groups;
  }
  // Bins q owned by this thread: first_bin, then in steps of the block when there is one group.
  __device__ __forceinline__ unsigned int bin_step() const { return groups > 1 ? bins : threads; }
};

// Streaming store of one value of any element type.
template <class T>
__device__ __forceinline__ void store_result(T* __restrict__ address, T value) {
  union {
    T value;
    unsigned short b16;
    unsigned int b32;
    unsigned long long b64;
  } bits;
  bits.value = value;
  if constexpr (sizeof(T) == 2) {
    store_streaming(reinterpret_cast<unsigned short*>(address), bits.b16);
  } else if constexpr (sizeof(T) == 4) {
    store_streaming(reinterpret_cast<unsigned int*>(address), bits.b32);
  } else {
    store_streaming(reinterpret_cast<unsigned long long*>(address), bits.b64);
  }
}

// The value a comparison works on: float for the 16-bit types and float32, double for float64.
// Conversions are exact both ways (-0 kept); kKeepsNaN says whether a NaN also keeps its payload
// on the round trip (float16's does not, so the kernels copy a NaN result from the input).
template <class T>
struct Work;
// float32 and float64 work on themselves.
template <class T>
struct WorkNative {
  typedef T V;
  static constexpr bool kKeepsNaN = true;
  static __device__ __forceinline__ T lowest() {
    if constexpr (sizeof(T) == 4) {
      return __int_as_float(0xff800000u);
    } else {
      return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
    }
  }
  static __device__ __forceinline__ T in(T v) { return v; }
  static __device__ __forceinline__ T out(T v) { return v; }
};
template <>
struct Work<float> : WorkNative<float> {};
template <>
struct Work<double> : WorkNative<double> {};
template <>
struct Work<roi_half> {
  typedef float V;
  static constexpr bool kKeepsNaN = false;
  static __device__ __forceinline__ float lowest() { return Work<float>::lowest(); }
  static __device__ __forceinline__ float in(roi_half v) { return half_to_float(v.bits); }
  static __device__ __forceinline__ roi_half out(float v) {
    roi_half h;
    h.bits = float_to_half(v);
    return h;
  }
};
template <>
struct Work<roi_bf16> {
  typedef float V;
  static constexpr bool kKeepsNaN = true;  // the bits shift 16 places and back
  static __device__ __forceinline__ float lowest() { return Work<float>::lowest(); }
  static __device__ __forceinline__ float in(roi_bf16 v) { return bf16_to_float(v.bits); }
  static __device__ __forceinline__ roi_bf16 out(float v) {
    roi_bf16 b;
    b.bits = static_cast<unsigned short>(__float_as_uint(v) >> 16);
    return b;
  }
};

__device__ __forceinline__ bool replaces(double v, double best) {
  return !(v <= best) && best == best;  // float64 operations never flush
}

// The first element of a non-empty bin whose key equals `key` (integer compares: no flushing):
// the first NaN or the first zero of a bin whose maximum is one, with its exact bits.
template <class T>
__device__ __noinline__ T first_with_key(const T* __restrict__ bin, int bin_h, int bin_w, i64 sH,
                                         i64 sW, typename Elem<T>::key key) {
  for (int i = 0; i < bin_h; ++i) {
    for (int j = 0; j < bin_w; ++j) {
      const T v = bin[i * sH + j * sW];
      if (Elem<T>::key_of(v) == key) return v;
    }
  }
  return bin[0];  // unreachable: the maximum is one of the bin's elements
}

// first_with_key's element as its row and column in the bin, for a kernel that also needs where
// it is.
template <class T>
__device__ __noinline__ int2 first_position_with_key(const T* __restrict__ bin, int bin_h,
                                                     int bin_w, i64 sH, i64 sW,
                                                     typename Elem<T>::key key) {
  for (int i = 0; i < bin_h; ++i) {
    for (int j = 0; j < bin_w; ++j) {
      if (Elem<T>::key_of(bin[i * sH + j * sW]) == key) return make_int2(i, j);
    }
  }
  return make_int2(0, 0);  // unreachable: the maximum is one of the bin's elements
}

// Inference without argmax: the bin's maximum through one max.NaN per element instead of a
// compare-and-select. Results that are a zero or a NaN are replaced by the bin's first element
// with the same key (`first_with_key`): the contract's first zero or first NaN. float64 keeps
// the compare-and-select path.
template <class T>
struct NaNMax {
  static constexpr bool kEnabled = false;
};
#ifdef ROI_OPS_MAX_NAN
template <>
struct NaNMax<float> {
  static constexpr bool kEnabled = true;
  typedef float V;
  static __device__ __forceinline__ V load(const float* p) { return *p; }
  static __device__ __forceinline__ V lowest() { return Work<float>::lowest(); }
  static __device__ __forceinline__ V max(V a, V b) { return max_nan(a, b); }
  static __device__ __forceinline__ float bits(V m) { return m; }
  // Not a zero and not a NaN: the result's bits are those of the bin's first maximal element.
  static __device__ __forceinline__ bool exact(V m) {
    const unsigned int magnitude = __float_as_int(m) & 0x7fffffffu;
    return magnitude != 0u && magnitude <= 0x7f800000u;
  }
};
// float16 and bfloat16: the same on their raw bits; kInfBits is the type's +inf pattern.
template <class T, unsigned int kInf>
struct NaNMax16 {
  static constexpr bool kEnabled = true;
  static constexpr unsigned int kInfBits = kInf;
  typedef unsigned short V;
  static __device__ __forceinline__ V load(const T* p) { return p->bits; }
  static __device__ __forceinline__ V lowest() { return V(kInfBits | 0x8000u); }
  static __device__ __forceinline__ V max(V a, V b) {
    return kInfBits == 0x7c00u ? max_nan_f16(a, b) : max_nan_bf16(a, b);
  }
  static __device__ __forceinline__ T bits(V m) {
    T t;
    t.bits = m;
    return t;
  }
  static __device__ __forceinline__ bool exact(V m) {
    const unsigned int magnitude = m & 0x7fffu;
    return magnitude != 0u && magnitude <= kInfBits;
  }
};
template <>
struct NaNMax<roi_half> : NaNMax16<roi_half, 0x7c00u> {};
template <>
struct NaNMax<roi_bf16> : NaNMax16<roi_bf16, 0x7f80u> {};
#endif

// The 16-bit argmax through masks, in 32-bit words of two channels' maxima and of their
// positions in the bin (row << 8 | column in each half: bins of at most 256 rows and columns,
// kMaxSide). A step takes an element's word of two channels: the mask of the halves it raises
// (set.gt against the maxima so far), the new maxima (max.NaN), and its position merged where
// the mask is set; no compare-and-select per channel. A maximum found first at some element is
// raised there and never again (ties, and smaller elements, do not raise it), so the position
// is its first occurrence wherever the maximum is neither a zero (the signs compare equal) nor a
// NaN (a NaN raises nothing; max.NaN keeps it): those channels scan the bin again
// (first_position_with_key). float16 wherever max.NaN is (sm_80+), bfloat16 where set.gt takes
// its pairs (sm_90+); elsewhere, and for float32 (through masks it was slower: development
// log), the argmax compares one channel at a time.
template <class T>
struct PackedArgmax {
  static constexpr bool kEnabled = false;
};
#ifdef ROI_OPS_MAX_NAN
template <class T, unsigned int (*kRaised)(unsigned int, unsigned int)>
struct PackedArgmax16 {
  static constexpr bool kEnabled = true;
  static constexpr int kMaxSide = 256;
  static __device__ __forceinline__ unsigned int lowest() {
    return (NaNMax<T>::kInfBits | 0x8000u) * 0x10001u;  // -inf in both halves
  }
  static __device__ __forceinline__ unsigned int row(int i) {
    return static_cast<unsigned int>(i) << 8;
  }
  static __device__ __forceinline__ int offset(unsigned int position, int w_int) {
    return static_cast<int>(position >> 8) * w_int + static_cast<int>(position & 255u);
  }
  static __device__ __forceinline__ bool exact(unsigned int bits) {
    return NaNMax<T>::exact(static_cast<unsigned short>(bits));
  }
  static __device__ __forceinline__ void step(unsigned int v, unsigned int position,
                                              unsigned int& maxima, unsigned int& positions) {
    const unsigned int raised = kRaised(v, maxima);
    maxima = NaNMax<T>::kInfBits == 0x7c00u ? max_nan_f16x2(maxima, v) : max_nan_bf16x2(maxima, v);
    positions = (positions & ~raised) | (position * 0x10001u & raised);
  }
};
template <>
struct PackedArgmax<roi_half> : PackedArgmax16<roi_half, gt_mask_f16x2> {};
#ifdef ROI_OPS_GT_MASK_BF16X2
template <>
struct PackedArgmax<roi_bf16> : PackedArgmax16<roi_bf16, gt_mask_bf16x2> {};
#endif
#endif

// float16/bfloat16 gradients accumulate in float32.
template <class T>
struct Accum {
  typedef float type;
};
template <>
struct Accum<double> {
  typedef double type;
};

}  // namespace roi_ops_cuda
