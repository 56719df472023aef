// RoI max pooling (the Fast R-CNN op) for roi_ops, exact to docs/contract.md.
//
// Compiled at run time by NVRTC through CuPy (roi_ops_cupy/launch.py), once per device and
// (input, rois) dtype pair; every shape is a run-time argument. The file includes no header at
// all, so NVRTC needs no CUDA include path: float16 and bfloat16 are handled as their bit
// patterns (roi_half, roi_bf16) with PTX conversions, which avoids mixing CuPy's bundled
// cuda_fp16.h with a toolkit's cuda_bf16.h of another version.
//
// Kernels (T: input type, R: rois type; the geometry type G follows from R):
//   roi_pool_forward_plane<T, R, kArgmax>  one block per (ROI, channel block). Each thread keeps
//       one bin (geometry computed once, in registers) for every channel it visits: with
//       nb = PH * PW <= 256 the block is floor(256 / nb) groups of nb threads (rounded up to a
//       warp), so one step of all groups stores floor(256 / nb) * nb consecutive outputs;
//       larger nb runs 256 threads that loop over bins.
//       For inputs whose width stride is the smallest (NCHW contiguous and most other layouts).
//   roi_pool_forward_cvec<T, R, kArgmax>   channels_last with 16-byte aligned channel vectors:
//       one block per (ROI, channel block); a thread reads each element of its bin for 8 adjacent
//       channels (4 in float64) with one or two 16-byte loads; results are staged in shared
//       memory and stored in output order.
//   roi_pool_forward_chan<T, R, kArgmax>   one block per (ROI, 32 channels); lanes run over
//       channels, so loads are coalesced when the channel stride is the smallest (channels_last
//       inputs whose channel vectors are not aligned);
//       8 warps split the bins, whose edges the block caches in shared memory (dynamic,
//       8 * (PH + PW) bytes, unless cache_edges = 0); results are staged in shared memory and
//       stored in output order.
//   roi_pool_backward_atomic<T>            grad_input[b, c].flat[argmax] += grad_output with
//       global atomics into a zero-filled grad_input, in the plane kernel's thread layout.
//   roi_pool_backward_planes<T, kBlock>    the same sums in shared memory: one block per (image,
//       channel) plane, written out once and rounded (no zero fill, no conversion pass); for
//       planes that fit in shared memory. Neither backward is run-to-run deterministic; the
//       Python side never uses them in deterministic mode.
//
// Build flags: --fmad=false (CuPy adds -ftz=true). The geometry uses the _rn intrinsics anyway,
// so no contraction into FMA can change a rounding, and it meets no subnormal that could change
// an integral result; the reduction compares integer keys, so flushing cannot touch it.

typedef long long i64;

struct roi_half {
  unsigned short bits;
};
struct roi_bf16 {
  unsigned short bits;
};

namespace roi_ops_cuda {

constexpr i64 kIndexLimit = 1099511627776LL;  // 2^40, the contract's index() saturation
constexpr int kThreads = 256;                  // every kernel runs 256-thread blocks
constexpr int kChanLanes = 32;                 // channels per block of the chan kernel
constexpr int kChanWarps = kThreads / kChanLanes;
constexpr int kChanBins = 64;                  // bins staged in shared memory per round

#ifndef ROI_OPS_HOST_EMULATION  // tools/host_emulator.cpp supplies CPU versions
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
#endif

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
template <>
struct Elem<roi_half> {
  typedef int key;
  static __device__ __forceinline__ int key_of(roi_half v) {
    const int magnitude = v.bits & 0x7fff;
    return magnitude > 0x7c00 ? 0x7fff : ((v.bits & 0x8000) ? -magnitude : magnitude);
  }
  static __device__ __forceinline__ float value_of(roi_half v) { return half_to_float(v.bits); }
};
template <>
struct Elem<roi_bf16> {
  typedef int key;
  static __device__ __forceinline__ int key_of(roi_bf16 v) {
    const int magnitude = v.bits & 0x7fff;
    return magnitude > 0x7f80 ? 0x7fff : ((v.bits & 0x8000) ? -magnitude : magnitude);
  }
  static __device__ __forceinline__ float value_of(roi_bf16 v) { return bf16_to_float(v.bits); }
};

// ---- Geometry dtypes: every operation rounded to G, as C++ does with a variable of type G ----

struct GeomFloat {
  typedef float V;
  static __device__ __forceinline__ V mul(V a, V b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ V div(V a, V b) { return __fdiv_rn(a, b); }
  static __device__ __forceinline__ V from_int(i64 v) { return __ll2float_rn(v); }
  static __device__ __forceinline__ V scale(double s) { return __double2float_rn(s); }
  static __device__ __forceinline__ V floor_(V x) { return floorf(x); }
  static __device__ __forceinline__ V ceil_(V x) { return ceilf(x); }
  static __device__ __forceinline__ V round_(V x) { return roundf(x); }  // halves away from 0
  static __device__ __forceinline__ bool finite(V x) { return fabsf(x) <= 3.40282347e+38f; }
};

struct GeomDouble {
  typedef double V;
  static __device__ __forceinline__ V mul(V a, V b) { return __dmul_rn(a, b); }
  static __device__ __forceinline__ V div(V a, V b) { return __ddiv_rn(a, b); }
  static __device__ __forceinline__ V from_int(i64 v) { return __ll2double_rn(v); }
  static __device__ __forceinline__ V scale(double s) { return s; }
  static __device__ __forceinline__ V floor_(V x) { return floor(x); }
  static __device__ __forceinline__ V ceil_(V x) { return ceil(x); }
  static __device__ __forceinline__ V round_(V x) { return round(x); }
  static __device__ __forceinline__ bool finite(V x) {
    return fabs(x) <= 1.7976931348623157e+308;
  }
};

// float16 geometry, held in float registers whose values are always float16 values. A float16
// product of two float16 values is exact in float, so rounding it to float16 once is the
// float16 product; for quotients float has more than 2 * 11 + 2 bits, so float-then-float16
// double rounding equals a direct float16 division. Conversions from integers: exact in float
// below 2^24, and anything from 2^24 up is +-inf in float16 either way.
struct GeomHalf {
  typedef float V;
  static __device__ __forceinline__ V to_half(float x) { return half_to_float(float_to_half(x)); }
  static __device__ __forceinline__ V mul(V a, V b) { return to_half(__fmul_rn(a, b)); }
  static __device__ __forceinline__ V div(V a, V b) { return to_half(__fdiv_rn(a, b)); }
  static __device__ __forceinline__ V from_int(i64 v) { return to_half(__ll2float_rn(v)); }
  static __device__ __forceinline__ V scale(double s) { return to_half(__double2float_rn(s)); }
  static __device__ __forceinline__ V floor_(V x) { return floorf(x); }  // exact in float16
  static __device__ __forceinline__ V ceil_(V x) { return ceilf(x); }
  static __device__ __forceinline__ V round_(V x) { return roundf(x); }
  static __device__ __forceinline__ bool finite(V x) { return fabsf(x) <= 65504.0f; }
};

// The geometry dtype of each rois dtype (bfloat16 rois use float32) and how to read one value.
template <class R>
struct Rois;
template <>
struct Rois<roi_half> {
  typedef GeomHalf G;
  static __device__ __forceinline__ float load(roi_half r) { return half_to_float(r.bits); }
};
template <>
struct Rois<roi_bf16> {
  typedef GeomFloat G;
  static __device__ __forceinline__ float load(roi_bf16 r) { return bf16_to_float(r.bits); }
};
template <>
struct Rois<float> {
  typedef GeomFloat G;
  static __device__ __forceinline__ float load(float r) { return r; }
};
template <>
struct Rois<double> {
  typedef GeomDouble G;
  static __device__ __forceinline__ double load(double r) { return r; }
};

// The contract's index(v) for an integral G value: NaN -> 0, saturate to [-2^40, 2^40].
template <class V>
__device__ __forceinline__ i64 to_index(V v) {
  if (!(v == v)) return 0;
  if (v >= static_cast<V>(kIndexLimit)) return kIndexLimit;
  if (v <= -static_cast<V>(kIndexLimit)) return -kIndexLimit;
  return static_cast<i64>(v);
}

template <class G>
struct RoiGeometry {
  i64 batch;  // image index, or -1 for an invalid ROI (every bin empty)
  i64 x1, y1;
  typename G::V bin_w, bin_h;
};

// Steps 1-4 of the contract for the ROI whose five values start at `row` (stride `stride`).
template <class R>
__device__ __forceinline__ RoiGeometry<typename Rois<R>::G> roi_geometry(
    const R* __restrict__ row, i64 stride, i64 num_images, double spatial_scale, i64 PH, i64 PW) {
  typedef typename Rois<R>::G G;
  typedef typename G::V V;
  V v[5];
  bool valid = true;
#pragma unroll
  for (int j = 0; j < 5; ++j) {
    v[j] = Rois<R>::load(row[j * stride]);
    valid = valid && G::finite(v[j]);
  }
  const double batch = trunc(static_cast<double>(v[0]));
  valid = valid && batch >= 0.0 && batch < static_cast<double>(num_images);
  const V s = G::scale(spatial_scale);
  const i64 x1 = to_index(G::round_(G::mul(v[1], s)));
  const i64 y1 = to_index(G::round_(G::mul(v[2], s)));
  const i64 x2 = to_index(G::round_(G::mul(v[3], s)));
  const i64 y2 = to_index(G::round_(G::mul(v[4], s)));
  const i64 roi_w = x2 - x1 + 1 > 1 ? x2 - x1 + 1 : 1;
  const i64 roi_h = y2 - y1 + 1 > 1 ? y2 - y1 + 1 : 1;
  RoiGeometry<G> g;
  g.batch = valid ? static_cast<i64>(batch) : -1;
  g.x1 = x1;
  g.y1 = y1;
  g.bin_w = G::div(G::from_int(roi_w), G::from_int(PW));
  g.bin_h = G::div(G::from_int(roi_h), G::from_int(PH));
  return g;
}

// Step 5: [start, end) of bin p along one axis, clamped to [0, limit]; empty for invalid ROIs.
template <class G>
__device__ __forceinline__ int2 bin_span(i64 p, typename G::V bin, i64 corner, i64 limit,
                                         bool valid) {
  if (!valid) return make_int2(0, 0);
  const i64 lo = to_index(G::floor_(G::mul(G::from_int(p), bin))) + corner;
  const i64 hi = to_index(G::ceil_(G::mul(G::from_int(p + 1), bin))) + corner;
  return make_int2(static_cast<int>(clamp_to<i64>(lo, 0, limit)),
                   static_cast<int>(clamp_to<i64>(hi, 0, limit)));
}

// Shared-memory edge cache (the chan kernel's is dynamic, the cvec kernel's static): rows
// [0, PH) then columns [PH, PH + PW). Filled by the whole block (a barrier follows).
#ifndef ROI_OPS_HOST_EMULATION
extern __shared__ int2 roi_edges[];
#endif

template <class G>
__device__ __forceinline__ void fill_edge_cache(int2* edges, const RoiGeometry<G>& g, i64 PH,
                                                i64 PW, i64 H, i64 W, int tid) {
  const bool valid = g.batch >= 0;
  const int count = static_cast<int>(PH + PW);  // cached only when small (launcher, kCvecEdges)
  for (int i = tid; i < count; i += kThreads) {
    edges[i] = i < PH ? bin_span<G>(i, g.bin_h, g.y1, H, valid)
                      : bin_span<G>(i - PH, g.bin_w, g.x1, W, valid);
  }
  __syncthreads();
}

template <class G>
__device__ __forceinline__ int2 row_span(const int2* edges, const RoiGeometry<G>& g, bool cached,
                                         int ph, i64 H) {
  return cached ? edges[ph] : bin_span<G>(ph, g.bin_h, g.y1, H, g.batch >= 0);
}

template <class G>
__device__ __forceinline__ int2 col_span(const int2* edges, const RoiGeometry<G>& g, bool cached,
                                         i64 PH, int pw, i64 W) {
  return cached ? edges[PH + pw] : bin_span<G>(pw, g.bin_w, g.x1, W, g.batch >= 0);
}

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

}  // namespace roi_ops_cuda

// ---- Kernels ----------------------------------------------------------------------------------
// <= 256 threads, at least 5 blocks per SM: every kernel fits in 48 registers without
// spills on sm_80 and sm_90 (6 blocks spilled the chan kernel; unconstrained, ptxas spilled on
// sm_80). A tuning knob for the GPU machine. The planes backward sets its own bounds (its
// 1024-thread blocks run one per SM).
#define ROI_OPS_LAUNCH_BOUNDS __launch_bounds__(256, 5)

// Shapes and strides are in elements. Launch: grid (K, channel blocks); blocks of (32, 8) for
// chan, of at most 256 threads for plane and backward (see PlaneLayout); the chan kernel takes
// dynamic shared memory 8 * (PH + PW) bytes when cache_edges != 0, else 0. argmax may be null
// when kArgmax is false.

namespace roi_ops_cuda {
// The plane layout: which bins a thread owns and which channels of a block it visits. The
// launcher sizes the block to whole groups (rounded up to a warp) when nb <= 256.
struct PlaneLayout {
  unsigned int bins;    // nb = PH * PW
  unsigned int groups;  // threads own bins in `groups` groups of nb (nb <= threads), else 1
  unsigned int threads;
  unsigned int first_bin, first_channel;
  bool active;  // false for the threads left over after the last whole group
  __device__ __forceinline__ PlaneLayout(i64 PH, i64 PW, unsigned int tid, unsigned int count) {
    bins = static_cast<unsigned int>(PH * PW);  // < 2^31 - 256 (launcher checks)
    threads = count;
    groups = bins <= threads ? threads / bins : 1;
    first_bin = groups > 1 ? tid % bins : tid;
    first_channel = groups > 1 ? tid / bins : 0;
    active = first_channel < groups;
  }
  // Bins q owned by this thread: first_bin, then in steps of the block when there is one group.
  __device__ __forceinline__ unsigned int bin_step() const { return groups > 1 ? bins : threads; }
};

// The unit kernel's layout: the plane layout, except that (with spread_tail) when one group's
// last warp would hold only a few bins (nb % 32 <= 16, e.g. 4 of 14 x 14 = 196), that warp's
// lanes spread over those bins' channels (`stride` of them interleaved) instead of idling: a
// warp's instructions cost the same with 4 lanes busy as with 32. Measured on the H100 (mask-14):
// inference 5-7% faster; with the argmax float32 8% slower, float16 level (that warp then writes
// its 16-byte pieces of output rows long before the other warps write the rest of their sectors),
// so only inference spreads.
struct UnitLayout {
  unsigned int bins, first_bin, bin_step;
  unsigned int first_channel, stride;  // channels first_channel, + stride, ... of each block
  bool active;
  __device__ __forceinline__ UnitLayout(i64 PH, i64 PW, unsigned int tid, unsigned int count,
                                        bool spread_tail) {
    const PlaneLayout plane(PH, PW, tid, count);
    bins = plane.bins;
    first_bin = plane.first_bin;
    bin_step = plane.bin_step();
    first_channel = plane.first_channel;
    stride = plane.groups;
    active = plane.active;
    const unsigned int tail = bins % 32u, head = bins - tail;
    if (spread_tail && plane.groups == 1 && bins <= count && tail != 0 && tail <= 16u &&
        head + 32u <= count && tid >= head && tid < head + 32u) {
      const unsigned int lane = tid - head;
      stride = 32u / tail;
      first_bin = head + lane % tail;
      first_channel = lane / tail;
      active = lane < tail * stride;
    }
  }
};
}  // namespace roi_ops_cuda

template <class T, class R, bool kArgmax>
__global__ void ROI_OPS_LAUNCH_BOUNDS
    roi_pool_forward_plane(const T* __restrict__ input, const i64 N, const i64 C, const i64 H,
                           const i64 W, const i64 sN, const i64 sC, const i64 sH, const i64 sW,
                           const R* __restrict__ rois, const i64 rs0, const i64 rs1,
                           const double spatial_scale, const i64 PH, const i64 PW,
                           const i64 channels_per_block, T* __restrict__ output,
                           int* __restrict__ argmax) {
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
}

template <class T, class R, bool kArgmax>
__global__ void ROI_OPS_LAUNCH_BOUNDS
    roi_pool_forward_chan(const T* __restrict__ input, const i64 N, const i64 C, const i64 H,
                          const i64 W, const i64 sN, const i64 sC, const i64 sH, const i64 sW,
                          const R* __restrict__ rois, const i64 rs0, const i64 rs1,
                          const double spatial_scale, const i64 PH, const i64 PW,
                          const i64 cache_edges, T* __restrict__ output,
                          int* __restrict__ argmax) {
  using namespace roi_ops_cuda;
  typedef typename Rois<R>::G G;
  // [bin][channel], padded so that both the lane-per-channel writes and the bin-major reads
  // are free of bank conflicts.
  __shared__ T tile_value[kChanBins][kChanLanes + 1];
  __shared__ int tile_index[kChanBins][kChanLanes + 1];
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int tid = warp * kChanLanes + lane;
  const i64 k = blockIdx.x;
  const RoiGeometry<G> g = roi_geometry<R>(rois + k * rs0, rs1, N, spatial_scale, PH, PW);
  const bool cached = cache_edges != 0;
  if (cached) fill_edge_cache<G>(roi_edges, g, PH, PW, H, W, tid);
  const int nb = static_cast<int>(PH * PW);  // < 2^31 (launcher checks)
  const int pw_count = static_cast<int>(PW);
  const T* __restrict__ image = input + (g.batch > 0 ? g.batch : 0) * sN;
  for (i64 c0 = static_cast<i64>(blockIdx.y) * kChanLanes; c0 < C;
       c0 += static_cast<i64>(gridDim.y) * kChanLanes) {
    const int channels = C - c0 < kChanLanes ? static_cast<int>(C - c0) : kChanLanes;
    const bool active = lane < channels;
    const T* __restrict__ plane = image + (c0 + (active ? lane : 0)) * sC;
    for (int q0 = 0; q0 < nb; q0 += kChanBins) {
      const int bins = nb - q0 < kChanBins ? nb - q0 : kChanBins;
      for (int qi = warp; qi < bins; qi += kChanWarps) {
        const int ph = (q0 + qi) / pw_count;
        const int pw = q0 + qi - ph * pw_count;
        if (active) {
          const BinMax<T> m = bin_max<T>(plane, row_span<G>(roi_edges, g, cached, ph, H),
                                         col_span<G>(roi_edges, g, cached, PH, pw, W), sH, sW,
                                         W);
          tile_value[qi][lane] = m.value;
          if (kArgmax) tile_index[qi][lane] = m.index;
        }
      }
      __syncthreads();
      // Store channel by channel, bins contiguous: all of it contiguous when nb <= kChanBins.
      const i64 out0 = (k * C + c0) * nb + q0;
      for (int e = tid; e < channels * bins; e += kThreads) {
        const int cl = e / bins;
        const int qi = e - cl * bins;
        const i64 o = out0 + static_cast<i64>(cl) * nb + qi;
        output[o] = tile_value[qi][cl];
        if (kArgmax) argmax[o] = tile_index[qi][cl];
      }
      __syncthreads();
    }
  }
}


// ---- The unit kernel: the plane kernel's layout, tuned for a unit W stride -------------------
// Same thread layout as roi_pool_forward_plane (a thread keeps one bin's geometry for every
// channel it visits), with the inner loop cut to a load, two compares and two selects per
// element: each thread reduces kUnitChannels channels at once (independent loads in flight, loop
// overhead shared), compares floats directly in PTX without flushing subnormals, starts from
// -inf at the bin's first element (so no "empty so far" test and no extra first load), steps
// along a row with unit stride, and moves between channels by pointer additions.
// Tuning knobs (kernels.py may pass -D options for tuning runs; these are the defaults).
// Streaming stores measured 0-3% faster on the H100 (scripts/gpu_probe.py, unit-cs).
#ifndef ROI_OPS_NO_STREAMING_STORES
#define ROI_OPS_STREAMING_STORES
#endif
#ifndef ROI_OPS_UNIT_CHANNELS
#define ROI_OPS_UNIT_CHANNELS 4
#endif
#ifndef ROI_OPS_UNIT_MIN_BLOCKS
#define ROI_OPS_UNIT_MIN_BLOCKS 4
#endif

namespace roi_ops_cuda {
constexpr int kUnitChannels = ROI_OPS_UNIT_CHANNELS;

// Stores of results nobody reads in this kernel: marked evict-first (st.global.cs) so that they
// do not push the input out of L2 (unless built with -DROI_OPS_NO_STREAMING_STORES).
template <class T>
__device__ __forceinline__ void store_result(T* __restrict__ address, T value) {
#if defined(ROI_OPS_STREAMING_STORES) && !defined(ROI_OPS_HOST_EMULATION)
  union {
    T value;
    unsigned short b16;
    unsigned int b32;
    unsigned long long b64;
  } bits;
  bits.value = value;
  if (sizeof(T) == 2) {
    asm volatile("st.global.cs.b16 [%0], %1;" ::"l"(address), "h"(bits.b16) : "memory");
  } else if (sizeof(T) == 4) {
    asm volatile("st.global.cs.b32 [%0], %1;" ::"l"(address), "r"(bits.b32) : "memory");
  } else {
    asm volatile("st.global.cs.b64 [%0], %1;" ::"l"(address), "l"(bits.b64) : "memory");
  }
#else
  *address = value;
#endif
}

// The value a comparison works on: float for the 16-bit types and float32, double for float64.
// Conversions are exact both ways (-0 kept); kKeepsNaN says whether a NaN also keeps its payload
// on the round trip (float16's does not, so the kernel copies a NaN result from the input).
template <class T>
struct Work;
template <>
struct Work<float> {
  typedef float V;
  static constexpr bool kKeepsNaN = true;
  static __device__ __forceinline__ float lowest() { return __int_as_float(0xff800000u); }
  static __device__ __forceinline__ float in(float v) { return v; }
  static __device__ __forceinline__ float out(float v) { return v; }
};
template <>
struct Work<double> {
  typedef double V;
  static constexpr bool kKeepsNaN = true;
  static __device__ __forceinline__ double lowest() {
    return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
  }
  static __device__ __forceinline__ double in(double v) { return v; }
  static __device__ __forceinline__ double out(double v) { return v; }
};
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

// Whether v replaces best as the first maximal element so far: v > best, or v is NaN; never once
// best is NaN (the first NaN wins). -0 == +0, so the earlier zero stays. PTX without .ftz:
// CuPy compiles with -ftz=true, under which C++ float comparisons flush subnormals to zero.
__device__ __forceinline__ bool replaces(float v, float best) {
#ifdef ROI_OPS_HOST_EMULATION
  return !(v <= best) && best == best;
#else
  unsigned int r;
  asm("{\n\t.reg .pred p;\n\tsetp.gtu.f32 p, %1, %2;\n\tsetp.num.and.f32 p, %2, %2, p;\n\t"
      "selp.u32 %0, 1, 0, p;\n\t}"
      : "=r"(r)
      : "f"(v), "f"(best));
  return r != 0;
#endif
}
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

// Inference without argmax: the bin's maximum through one max.NaN per element (NaN-propagating,
// no .ftz, sm_80+) instead of a compare-and-select. max.NaN returns one of its operands unless the
// result is a zero (either sign may come back) or a NaN (canonical, payload lost), so those
// results are replaced by the bin's first element with the same key (`first_with_key`): the
// contract's first zero or first NaN. float64 keeps the compare-and-select path.
// The host emulation is adversarial: ties return the later operand and NaNs a canonical NaN.
template <class T>
struct NaNMax {
  static constexpr bool kEnabled = false;
};
#if defined(ROI_OPS_HOST_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
template <>
struct NaNMax<float> {
  static constexpr bool kEnabled = true;
  typedef float V;
  static __device__ __forceinline__ V load(const float* p) { return *p; }
  static __device__ __forceinline__ V lowest() { return Work<float>::lowest(); }
  static __device__ __forceinline__ V max(V a, V b) {
#ifdef ROI_OPS_HOST_EMULATION
    return a != a || b != b ? __int_as_float(0x7fffffff) : (b >= a ? b : a);
#else
    V d;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
#endif
  }
  static __device__ __forceinline__ float bits(V m) { return m; }
  // Not a zero and not a NaN: the result's bits are those of the bin's first maximal element.
  static __device__ __forceinline__ bool exact(V m) {
    const unsigned int magnitude = __float_as_int(m) & 0x7fffffffu;
    return magnitude != 0u && magnitude <= 0x7f800000u;
  }
};
// float16 and bfloat16: the same on their raw bits; kInfBits is the type's +inf pattern.
template <class T, unsigned int kInfBits>
struct NaNMax16 {
  static constexpr bool kEnabled = true;
  typedef unsigned short V;
  static __device__ __forceinline__ V load(const T* p) { return p->bits; }
  static __device__ __forceinline__ V lowest() { return V(kInfBits | 0x8000u); }
  static __device__ __forceinline__ V max(V a, V b) {
#ifdef ROI_OPS_HOST_EMULATION
    const float x = Work<T>::in(bits(a)), y = Work<T>::in(bits(b));
    return x != x || y != y ? V(0x7fff) : (y >= x ? b : a);
#else
    V d;
    if constexpr (kInfBits == 0x7c00u) {
      asm("max.NaN.f16 %0, %1, %2;" : "=h"(d) : "h"(a), "h"(b));
    } else {
      asm("max.NaN.bf16 %0, %1, %2;" : "=h"(d) : "h"(a), "h"(b));
    }
    return d;
#endif
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

// The unit kernel's step for U channels of one bin. Channel u (0 <= u < U) of the step starts at
// planes + u * in_step and stores at out + u * out_step (arg likewise); it exists when
// u * groups < remaining. A missing channel reads channel 0 again and stores nothing. Pointers
// step by additions only: 64-bit index products per channel cost more than the reduction of a
// small bin (mask-14's bins hold about three elements).
template <class T, int U>
__device__ __forceinline__ void unit_channel_pointers(const T* __restrict__ planes, i64 in_step,
                                                      int remaining, int groups,
                                                      const T* __restrict__ (&p)[U],
                                                      bool (&exists)[U]) {
  const T* __restrict__ next = planes;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    exists[u] = u == 0 || u * groups < remaining;  // remaining >= 1
    p[u] = exists[u] ? next : planes;
    next += in_step;
  }
}

// Compare and select per element, tracking the argmax (NaN rules in `replaces`).
template <class T, int U, bool kArgmax, bool kSmall>
__device__ __forceinline__ void unit_max_compare(const T* __restrict__ planes, i64 in_step,
                                                 i64 sH, int remaining, int groups, int bin_h,
                                                 int bin_w, bool empty, int w_int,
                                                 int first_index, T* __restrict__ out,
                                                 int* __restrict__ arg, i64 out_step) {
  typedef typename Work<T>::V V;
  const T* __restrict__ p[U];
  bool exists[U];
  unit_channel_pointers<T, U>(planes, in_step, remaining, groups, p, exists);
  // -inf and the bin's first element: whatever the first element is (-inf, NaN, -0, ...), the
  // scan then leaves or replaces them exactly as if the scan had started from that element.
  V best[U];
  int at[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    best[u] = Work<T>::lowest();
    at[u] = 0;
  }
  if constexpr (kSmall) {
    // At most 2 x 2 (and not empty): four loads per channel, all issued at once, no loop. A
    // missing second row or column re-reads the first (a re-read element never replaces the
    // maximum). A 3 x 3 path for bins up to two pixels long measured slower on the H100 (its
    // 36 loads at once spill registers).
    const i64 down = bin_h > 1 ? sH : 0;
    const int right = bin_w > 1 ? 1 : 0;
    const int at_down = bin_h > 1 ? w_int : 0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const T* __restrict__ line = i == 0 ? p[u] : p[u] + down;
        const V left_value = Work<T>::in(line[0]);
        const V right_value = Work<T>::in(line[right]);
        const int row = i == 0 ? 0 : at_down;
        if (replaces(left_value, best[u])) {
          best[u] = left_value;
          at[u] = row;
        }
        if (replaces(right_value, best[u])) {
          best[u] = right_value;
          at[u] = row + right;
        }
      }
    }
  } else if (!empty) {
    int row = 0;  // i * W: the argmax offset of the current row
    for (int i = 0; i < bin_h; ++i) {
      for (int j = 0; j < bin_w; ++j) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const V v = Work<T>::in(p[u][j]);
          if (replaces(v, best[u])) {
            best[u] = v;
            at[u] = row + j;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) p[u] += sH;
      row += w_int;
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (exists[u]) {
      T value = Work<T>::out(empty ? V(0) : best[u]);
      if (!Work<T>::kKeepsNaN && !(best[u] == best[u])) {  // the NaN's payload was lost
        value = first_with_key<T>(planes + u * in_step, bin_h, bin_w, sH, 1,
                                  Elem<T>::key_of(value));
      }
      store_result<T>(out, value);
      if (kArgmax) store_result<int>(arg, empty ? -1 : first_index + at[u]);
    }
    out += out_step;
    if (kArgmax) arg += out_step;
  }
}

// The unit kernel's inference step for U channels of one bin (see NaNMax).
template <class T, int U, bool kSmall>
__device__ __forceinline__ void unit_max_no_argmax(const T* __restrict__ planes, i64 in_step,
                                                   i64 sH, int remaining, int groups, int bin_h,
                                                   int bin_w, bool empty, T* __restrict__ out,
                                                   i64 out_step) {
  typedef typename NaNMax<T>::V V;
  const T* __restrict__ p[U];
  bool exists[U];
  unit_channel_pointers<T, U>(planes, in_step, remaining, groups, p, exists);
  V m[U];  // max.NaN(-inf, v) is v for every v (a NaN's payload aside: see exact)
#pragma unroll
  for (int u = 0; u < U; ++u) m[u] = NaNMax<T>::lowest();
  if constexpr (kSmall) {  // as in unit_max_compare
    const i64 down = bin_h > 1 ? sH : 0;
    const int right = bin_w > 1 ? 1 : 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const T* __restrict__ lower = p[u] + down;
      const V upper_max = NaNMax<T>::max(NaNMax<T>::load(p[u]), NaNMax<T>::load(p[u] + right));
      const V lower_max = NaNMax<T>::max(NaNMax<T>::load(lower), NaNMax<T>::load(lower + right));
      m[u] = NaNMax<T>::max(upper_max, lower_max);
    }
  } else if (!empty) {
    for (int i = 0; i < bin_h; ++i) {
      for (int j = 0; j < bin_w; ++j) {
#pragma unroll
        for (int u = 0; u < U; ++u) m[u] = NaNMax<T>::max(m[u], NaNMax<T>::load(p[u] + j));
      }
#pragma unroll
      for (int u = 0; u < U; ++u) p[u] += sH;
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (exists[u]) {
      T value = NaNMax<T>::bits(empty ? V(0) : m[u]);
      if (!empty && !NaNMax<T>::exact(m[u])) {
        value = first_with_key<T>(planes + u * in_step, bin_h, bin_w, sH, 1,
                                  Elem<T>::key_of(value));
      }
      store_result<T>(out, value);
    }
    out += out_step;
  }
}

// Every channel block of one bin: the thread's channels first_channel, + groups, ... of each
// block, U at a time. kSmall: the bin has at most 2 x 2 elements (and is not empty); separate
// instantiations keep the two paths' registers apart.
template <class T, int U, bool kArgmax, bool kSmall>
__device__ __forceinline__ void unit_channels(
    const T* __restrict__ input, T* __restrict__ output, int* __restrict__ argmax, i64 C,
    i64 channels_per_block, i64 sC, i64 sH, i64 in_step, i64 out_step, i64 corner, i64 k,
    unsigned int q, unsigned int bins, int groups, int first_channel, int bin_h, int bin_w,
    bool empty, int w_int, int first_index) {
  for (i64 c0 = blockIdx.y * channels_per_block; c0 < C; c0 += gridDim.y * channels_per_block) {
    const int channels =
        static_cast<int>(C - c0 < channels_per_block ? C - c0 : channels_per_block);
    // Offsets (not pointers: the bases stay in constant memory) of the thread's next channel.
    i64 in_at = corner + (c0 + first_channel) * sC;
    i64 out_at = (k * C + c0 + first_channel) * bins + q;
    for (int cl = first_channel; cl < channels; cl += U * groups) {
      if constexpr (!kArgmax && NaNMax<T>::kEnabled) {
        unit_max_no_argmax<T, U, kSmall>(input + in_at, in_step, sH, channels - cl, groups,
                                         bin_h, bin_w, empty, output + out_at, out_step);
      } else {
        unit_max_compare<T, U, kArgmax, kSmall>(
            input + in_at, in_step, sH, channels - cl, groups, bin_h, bin_w, empty, w_int,
            first_index, output + out_at, kArgmax ? argmax + out_at : nullptr, out_step);
      }
      in_at += U * in_step;
      out_at += U * out_step;
    }
  }
}
}  // namespace roi_ops_cuda

// 64 registers (four blocks per SM): four channels' pointers, maxima and argmaxes at once.
// channels_per_block <= 2^24 (kernels.MAX_CHANNELS_PER_BLOCK; in practice a few thousand
// outputs per block), so the channel counters within a block are 32-bit; every offset into a
// tensor stays 64-bit.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(256, ROI_OPS_UNIT_MIN_BLOCKS)
    roi_pool_forward_unit(const T* __restrict__ input, const i64 N, const i64 C, const i64 H,
                          const i64 W, const i64 sN, const i64 sC, const i64 sH, const i64 sW,
                          const R* __restrict__ rois, const i64 rs0, const i64 rs1,
                          const double spatial_scale, const i64 PH, const i64 PW,
                          const i64 channels_per_block, T* __restrict__ output,
                          int* __restrict__ argmax) {
  using namespace roi_ops_cuda;
  typedef typename Rois<R>::G G;
  // float64 values and maxima take two registers each: half as many channels fit.
  constexpr int U = sizeof(T) == 8 && kUnitChannels > 1 ? kUnitChannels / 2 : kUnitChannels;
  (void)sW;  // 1: the launcher picks this kernel only for a unit W stride
  const i64 k = blockIdx.x;
  const RoiGeometry<G> g = roi_geometry<R>(rois + k * rs0, rs1, N, spatial_scale, PH, PW);
  const UnitLayout layout(PH, PW, threadIdx.x, blockDim.x, !kArgmax);
  if (!layout.active) return;  // no barrier follows
  const bool valid = g.batch >= 0;
  const i64 image = (valid ? g.batch : 0) * sN;
  const int w_int = static_cast<int>(W);  // H * W < 2^31 (checked by roi_ops)
  const int groups = static_cast<int>(layout.stride);
  const int first_channel = static_cast<int>(layout.first_channel);
  // Between the channels a thread visits: `groups` channels apart.
  const i64 in_step = static_cast<i64>(groups) * sC;
  const i64 out_step = static_cast<i64>(groups) * layout.bins;
  // Bins at most one pixel long give every bin at most 2 x 2 elements (the exact test below
  // stays per bin); ROI-wide, so the block's threads agree on the path.
  const bool small_roi = g.bin_h <= typename G::V(1) && g.bin_w <= typename G::V(1);
  for (unsigned int q = layout.first_bin; q < layout.bins; q += layout.bin_step) {
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    const unsigned int pw = q - ph * static_cast<unsigned int>(PW);
    const int2 rows = bin_span<G>(ph, g.bin_h, g.y1, H, valid);
    const int2 cols = bin_span<G>(pw, g.bin_w, g.x1, W, valid);
    const int bin_h = rows.y - rows.x;
    const int bin_w = cols.y - cols.x;
    const bool empty = bin_h <= 0 || bin_w <= 0;
    const bool small = small_roi && !empty && bin_h <= 2 && bin_w <= 2;
    const i64 corner = image + rows.x * sH + cols.x;  // the bin's first element in plane 0
    const int first_index = rows.x * w_int + cols.x;
    if (small) {
      unit_channels<T, U, kArgmax, true>(input, output, argmax, C, channels_per_block, sC, sH,
                                         in_step, out_step, corner, k, q, layout.bins, groups,
                                         first_channel, bin_h, bin_w, empty, w_int, first_index);
    } else {
      unit_channels<T, U, kArgmax, false>(input, output, argmax, C, channels_per_block, sC, sH,
                                          in_step, out_step, corner, k, q, layout.bins, groups,
                                          first_channel, bin_h, bin_w, empty, w_int, first_index);
    }
  }
}

// ---- The cvec kernel: channels adjacent in memory, 16 bytes of channels per load --------------
// For inputs whose channel stride is 1 (channels_last) and whose channel vectors are 16-byte
// aligned: the launcher checks the pointer, C and every stride
// (roi_ops.layout.aligned_channel_vector); other channel-adjacent inputs take the chan kernel. A
// thread keeps CvecShape<T>::kChannels channels (8; 4 in float64) and one bin at a time, and
// reads each element of the bin for all its channels with one or two 16-byte loads (CvecShape).
// Inference reduces with max.NaN (packed f16x2/bf16x2 for the 16-bit types), the argmax with
// the unit kernel's compare and select. Results are staged in shared memory, bin-major, and
// stored channel by channel in output order.
namespace roi_ops_cuda {
#ifndef ROI_OPS_CVEC_WIDE_VECTORS
#define ROI_OPS_CVEC_WIDE_VECTORS 2
#endif
constexpr int kCvecThreads = 8;  // most threads per bin (launcher: a power of two)
constexpr int kCvecBins = 64;    // bins staged in shared memory per round
constexpr int kCvecEdges = 128;  // PH + PW up to this: the block caches its bin edges

struct __align__(16) roi_vec16 {
  unsigned int w[4];
};

__device__ __forceinline__ roi_vec16 load_vec16(const void* __restrict__ address) {
#ifdef ROI_OPS_HOST_EMULATION
  roi_vec16 v;
  std::memcpy(&v, address, sizeof v);
  return v;
#else
  return *static_cast<const roi_vec16*>(address);
#endif
}

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

// max.NaN on a vector's four 32-bit words: one float32, or two packed float16/bfloat16 channels
// (max.NaN.f16x2 / .bf16x2: each half as the scalar max.NaN). Only where NaNMax is enabled.
template <class T>
struct PackedMax;
#if defined(ROI_OPS_HOST_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
template <>
struct PackedMax<float> {
  static __device__ __forceinline__ unsigned int lowest() { return 0xff800000u; }
  static __device__ __forceinline__ unsigned int max(unsigned int a, unsigned int b) {
    return __float_as_uint(NaNMax<float>::max(__uint_as_float(a), __uint_as_float(b)));
  }
  static __device__ __forceinline__ bool exact(const unsigned int (&m)[4], int i) {
    return NaNMax<float>::exact(__uint_as_float(m[i]));
  }
};
template <class T, unsigned int kInfBits>
struct PackedMax16 {
  static __device__ __forceinline__ unsigned int lowest() {
    return (kInfBits | 0x8000u) * 0x10001u;  // -inf in both halves
  }
  static __device__ __forceinline__ unsigned int max(unsigned int a, unsigned int b) {
#ifdef ROI_OPS_HOST_EMULATION
    const unsigned int low = NaNMax<T>::max(a & 0xffffu, b & 0xffffu);
    const unsigned int high = NaNMax<T>::max(a >> 16, b >> 16);
    return high << 16 | low;
#else
    unsigned int d;
    if constexpr (kInfBits == 0x7c00u) {
      asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    } else {
      asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    }
    return d;
#endif
  }
  static __device__ __forceinline__ bool exact(const unsigned int (&m)[4], int i) {
    return NaNMax<T>::exact(static_cast<unsigned short>(m[i >> 1] >> ((i & 1) * 16)));
  }
};
template <>
struct PackedMax<roi_half> : PackedMax16<roi_half, 0x7c00u> {};
template <>
struct PackedMax<roi_bf16> : PackedMax16<roi_bf16, 0x7f80u> {};
#endif

// The vectors a thread reads per element: two for float32 and float64 (loop and address work
// shared by 8 or 4 channels), one for the 16-bit types (already 8 channels).
template <class T>
struct CvecShape {
  static constexpr int kVectors = sizeof(T) == 2 ? 1 : ROI_OPS_CVEC_WIDE_VECTORS;
  static constexpr int kChannels = kVectors * Lanes<T>::kCount;  // a thread's channels
};

// One bin (corner: its first element of the thread's first channel; not empty) for the
// thread's channels: every element read once, as kVectors 16-byte vectors (a missing second
// vector re-reads the first: `second` is 0), in the contract's scan order. Writes each channel's
// value (as Lanes<T>::Word) and, with kArgmax, its argmax.
template <class T, bool kArgmax>
__device__ __forceinline__ void cvec_bin(const T* __restrict__ corner, int second, i64 sH, i64 sW,
                                         int bin_h, int bin_w, int first_index, int w_int,
                                         typename Lanes<T>::Word* __restrict__ values,
                                         int* __restrict__ indices) {
  typedef Lanes<T> L;
  constexpr int V = L::kCount;
  constexpr int P = CvecShape<T>::kVectors;
  constexpr int kChannels = CvecShape<T>::kChannels;
  if constexpr (!kArgmax && NaNMax<T>::kEnabled) {
    unsigned int m[P][4];  // P vectors of four words of maxima (max.NaN(-inf, v) is v)
#pragma unroll
    for (int p = 0; p < P; ++p) {
#pragma unroll
      for (int w = 0; w < 4; ++w) m[p][w] = PackedMax<T>::lowest();
    }
    for (int i = 0; i < bin_h; ++i) {
      const T* __restrict__ line = corner + i * sH;
#pragma unroll 2
      for (int j = 0; j < bin_w; ++j) {
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const roi_vec16 v = load_vec16(line + j * sW + p * second);
#pragma unroll
          for (int w = 0; w < 4; ++w) m[p][w] = PackedMax<T>::max(m[p][w], v.w[w]);
        }
      }
    }
    unsigned int inexact = 0;  // channels whose maximum is a zero or a NaN
#pragma unroll
    for (int p = 0; p < P; ++p) {
      roi_vec16 result;
#pragma unroll
      for (int w = 0; w < 4; ++w) result.w[w] = m[p][w];
#pragma unroll
      for (int c = 0; c < V; ++c) {
        values[p * V + c] = L::word(L::get(result, c));
        if (!PackedMax<T>::exact(m[p], c)) inexact |= 1u << (p * V + c);
      }
    }
    // Rare: those take the bin's first element with their key (nothing else is live here).
    while (inexact != 0) {
      const int c = __ffs(inexact) - 1;
      inexact &= inexact - 1;
      const T value = first_with_key<T>(corner + (c / V) * second + c % V, bin_h, bin_w, sH, sW,
                                        Elem<T>::key_of(L::from_word(values[c])));
      values[c] = L::word(value);
    }
  } else {
    typedef typename Work<T>::V WV;
    // Unrolling two elements spills float32's and float64's 8 and 4 channels (64 registers);
    // float16 and bfloat16 measured up to 12% faster with it.
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
          const roi_vec16 v = load_vec16(line + j * sW + p * second);
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
#pragma unroll
    for (int c = 0; c < kChannels; ++c) {
      T value = Work<T>::out(best[c]);
      if (!Work<T>::kKeepsNaN && !(best[c] == best[c])) {  // the NaN's payload was lost:
        const int i = at[c] / w_int;                        // re-read the winner
        value = corner[i * sH + (at[c] - i * w_int) * sW + (c / V) * second + c % V];
      }
      values[c] = L::word(value);
      if constexpr (kArgmax) indices[c] = first_index + at[c];
    }
  }
}
}  // namespace roi_ops_cuda

// channels_per_block: CvecShape<T>::kChannels times a power of two <= kCvecThreads (threads per
// bin); C a multiple of Lanes<T>::kCount; the input pointer and sN, sH, sW 16-byte aligned
// (sC == 1).
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(256, 4)
    roi_pool_forward_cvec(const T* __restrict__ input, const i64 N, const i64 C, const i64 H,
                          const i64 W, const i64 sN, const i64 sC, const i64 sH, const i64 sW,
                          const R* __restrict__ rois, const i64 rs0, const i64 rs1,
                          const double spatial_scale, const i64 PH, const i64 PW,
                          const i64 channels_per_block, T* __restrict__ output,
                          int* __restrict__ argmax) {
  using namespace roi_ops_cuda;
  typedef typename Rois<R>::G G;
  typedef Lanes<T> L;
  typedef typename L::Word Word;
  constexpr int V = L::kCount;
  constexpr int kChannels = CvecShape<T>::kChannels;
  constexpr int kWidth = kCvecThreads * kChannels + 1;  // padded: bin-major reads conflict-free
  __shared__ Word tile_value[kCvecBins][kWidth];
  __shared__ int tile_index[kArgmax ? kCvecBins : 1][kArgmax ? kWidth : 1];
  __shared__ int2 edges[kCvecEdges];
  (void)sC;  // 1
  const int tid = threadIdx.x;
  const i64 k = blockIdx.x;
  const RoiGeometry<G> g = roi_geometry<R>(rois + k * rs0, rs1, N, spatial_scale, PH, PW);
  const bool valid = g.batch >= 0;
  const bool cached = PH + PW <= kCvecEdges;  // the same for the whole block
  if (cached) fill_edge_cache<G>(edges, g, PH, PW, H, W, tid);
  const int nb = static_cast<int>(PH * PW);  // < 2^31 - 256 (launcher checks)
  const int pw_count = static_cast<int>(PW);
  const int w_int = static_cast<int>(W);  // H * W < 2^31 (checked by roi_ops)
  const int per_bin = static_cast<int>(channels_per_block) / kChannels;  // a power of two
  const int lane = tid & (per_bin - 1);  // the thread's channels: lane * kChannels, ...
  const int first_bin = tid / per_bin;
  const int bin_step = kThreads / per_bin;
  const T* __restrict__ image = input + (valid ? g.batch : 0) * sN;
  for (i64 c0 = static_cast<i64>(blockIdx.y) * channels_per_block; c0 < C;
       c0 += static_cast<i64>(gridDim.y) * channels_per_block) {
    const int channels =
        static_cast<int>(C - c0 < channels_per_block ? C - c0 : channels_per_block);
    const bool has_vector = lane * kChannels < channels;
    const int second = lane * kChannels + V < channels ? V : 0;  // kVectors == 2: the next one
    const T* __restrict__ planes = image + c0 + lane * kChannels;
    for (int q0 = 0; q0 < nb; q0 += kCvecBins) {
      const int bins = nb - q0 < kCvecBins ? nb - q0 : kCvecBins;
      if (has_vector) {
        for (int qi = first_bin; qi < bins; qi += bin_step) {
          const int q = q0 + qi;
          const int ph = q / pw_count;
          const int pw = q - ph * pw_count;
          const int2 rows = row_span<G>(edges, g, cached, ph, H);
          const int2 cols = col_span<G>(edges, g, cached, PH, pw, W);
          const int bin_h = rows.y - rows.x;
          const int bin_w = cols.y - cols.x;
          Word* __restrict__ values = &tile_value[qi][lane * kChannels];
          int* __restrict__ indices = nullptr;
          if constexpr (kArgmax) indices = &tile_index[qi][lane * kChannels];
          if (bin_h <= 0 || bin_w <= 0) {
#pragma unroll
            for (int c = 0; c < kChannels; ++c) {
              values[c] = L::word(Work<T>::out(typename Work<T>::V(0)));
              if constexpr (kArgmax) indices[c] = -1;
            }
          } else {
            cvec_bin<T, kArgmax>(planes + rows.x * sH + cols.x * sW, second, sH, sW, bin_h, bin_w,
                                 rows.x * w_int + cols.x, w_int, values, indices);
          }
        }
      }
      __syncthreads();
      // Channel by channel, bins contiguous: all of it contiguous when nb <= kCvecBins.
      const i64 out0 = (k * C + c0) * nb + q0;
      const int step_channels = kThreads / bins;
      const int step_bins = kThreads - step_channels * bins;
      int cl = tid / bins;
      int qi = tid - cl * bins;
      for (int e = tid; e < channels * bins; e += kThreads) {
        const i64 o = out0 + static_cast<i64>(cl) * nb + qi;
        store_result<T>(output + o, L::from_word(tile_value[qi][cl]));
        if constexpr (kArgmax) store_result<int>(argmax + o, tile_index[qi][cl]);
        qi += step_bins;
        cl += step_channels;
        if (qi >= bins) {
          qi -= bins;
          ++cl;
        }
      }
      __syncthreads();
    }
  }
}

namespace roi_ops_cuda {
template <class T>
struct Accum {
  typedef float type;  // float16/bfloat16 gradients accumulate in float32
};
template <>
struct Accum<double> {
  typedef double type;
};
}  // namespace roi_ops_cuda

// grad_input (N, C, H, W), zero-filled, of Accum<T>::type, with strides gi_image, gi_channel
// and gi_pixel (its W stride; the H stride is W * gi_pixel: contiguous or channels_last);
// grad_output any strides (zero strides too); argmax contiguous (K, C, PH, PW); batch_index
// (K,) int64 in [0, N).
template <class T>
__global__ void ROI_OPS_LAUNCH_BOUNDS
    roi_pool_backward_atomic(const T* __restrict__ grad_output, const i64 gs0, const i64 gs1,
                             const i64 gs2, const i64 gs3, const int* __restrict__ argmax,
                             const i64* __restrict__ batch_index, const i64 bs0, const i64 C,
                             const i64 HW, const i64 PH, const i64 PW,
                             const i64 channels_per_block,
                             typename roi_ops_cuda::Accum<T>::type* __restrict__ grad_input,
                             const i64 gi_image, const i64 gi_channel, const i64 gi_pixel) {
  using namespace roi_ops_cuda;
  const i64 k = blockIdx.x;
  const PlaneLayout layout(PH, PW, threadIdx.x, blockDim.x);
  if (!layout.active) return;
  typename Accum<T>::type* __restrict__ image = grad_input + batch_index[k * bs0] * gi_image;
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

namespace roi_ops_cuda {
constexpr int kPlanesUnroll = 4;  // independent (argmax, gradient) loads in flight per thread

// A float32 (float64) sum rounded once to the gradient's dtype, as torch's CUDA .to() rounds:
// Work<T>::out, except for bfloat16, whose Work::out only narrows values that came from
// bfloat16 (it keeps NaN payloads for the forward) and does not round.
template <class T>
struct Rounded {
  static __device__ __forceinline__ T of(typename Work<T>::V v) { return Work<T>::out(v); }
};
template <>
struct Rounded<roi_bf16> {
  static __device__ __forceinline__ roi_bf16 of(float v) {
    roi_bf16 b;
    b.bits = float_to_bf16(v);
    return b;
  }
};

#ifndef ROI_OPS_HOST_EMULATION
extern __shared__ __align__(16) unsigned char planes_shared[];
#endif
}  // namespace roi_ops_cuda

// The backward without global atomics or zero fill. One block per (image, channel block) keeps
// the block's gradient planes (channels_per_block * HW accumulators, float32 for the 16-bit
// types) in dynamic shared memory, finds its image's ROIs 1024 batch indices at a time (four per
// thread in 256-thread blocks; in order, by block-wide ballots; the next round's indices load
// while this round's gradients are added), adds their gradients there with shared-memory
// atomics and writes the planes out once, rounded: grad_input needs no zero fill and no
// conversion pass. kBlock is 256, or 1024 for
// planes so large that one block fills an SM's shared memory (enough loads in flight).
// Each thread walks its elements (ROI of the round, channel, bin) in steps of the block with a
// mixed-radix counter, so the inner loop has no division; the bins' grad_output offsets sit in a
// table. Grid: N * ceil(C / channels_per_block) blocks, channel block fastest; kBlock threads;
// dynamic shared memory PH * PW * 8 + channels_per_block * HW * sizeof(accumulator) bytes.
// grad_input (N, C, H, W) of T, contiguous or channels_last. Requires
// channels_per_block * PH * PW * kBlock < 2^31 and K < 2^31. Not run-to-run deterministic (the
// order of the shared-memory additions varies).
// Arguments as the atomic kernel's (grad_input of T, in either layout), then K.
namespace roi_ops_cuda {
// Blocks per SM in the planes kernel's launch bounds: 5 of 256 threads (4 for float64, whose
// 64-bit addresses and sums need more than 48 registers on sm_80), or 1 of 1024.
template <class T, int kBlock>
struct PlanesBlocksPerSM {
  static constexpr int value = kBlock == 256 ? (sizeof(T) == 8 ? 4 : 5) : 1;
};
}  // namespace roi_ops_cuda

template <class T, int kBlock>
__global__ void __launch_bounds__(kBlock, roi_ops_cuda::PlanesBlocksPerSM<T, kBlock>::value)
    roi_pool_backward_planes(const T* __restrict__ grad_output, const i64 gs0, const i64 gs1,
                             const i64 gs2, const i64 gs3, const int* __restrict__ argmax,
                             const i64* __restrict__ batch_index, const i64 bs0, const i64 C,
                             const i64 HW, const i64 PH, const i64 PW,
                             const i64 channels_per_block, T* __restrict__ grad_input,
                             const i64 gi_image, const i64 gi_channel, const i64 gi_pixel,
                             const i64 K) {
  using namespace roi_ops_cuda;
  typedef typename Accum<T>::type A;
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  i64* bin_offset = reinterpret_cast<i64*>(planes_shared);  // grad_output offset of each bin
  A* planes = reinterpret_cast<A*>(bin_offset + bins);
  // Batch indices each thread checks per round: more ROIs per round, fewer rounds of waiting.
  constexpr int kScan = kBlock == 256 ? 4 : 1;
  constexpr int kRound = kScan * kBlock;
  __shared__ int round_rois[kRound];  // this image's ROIs of the round, in order
  __shared__ int warp_counts[kScan][kBlock / 32];
  const unsigned int tid = threadIdx.x;
  const unsigned int lane = tid & 31u;
  const unsigned int warp = tid >> 5;
  const i64 channel_blocks = (C + channels_per_block - 1) / channels_per_block;
  const int image = static_cast<int>(blockIdx.x / channel_blocks);  // N < 2^31
  const i64 c0 = (blockIdx.x - image * channel_blocks) * channels_per_block;
  // This block's gradient planes, computed here: it keeps the kernel within its register bound.
  T* __restrict__ const grad_planes = grad_input + image * gi_image + c0 * gi_channel;
  const unsigned int channels =
      static_cast<unsigned int>(C - c0 < channels_per_block ? C - c0 : channels_per_block);
  const i64 plane_size = channels * HW;
  for (unsigned int q = tid; q < bins; q += kBlock) {
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    bin_offset[q] = ph * gs2 + (q - ph * static_cast<unsigned int>(PW)) * gs3;
  }
  for (i64 i = tid; i < plane_size; i += kBlock) planes[i] = A(0);
  const unsigned int per_roi = channels * bins;
  // The block's step (kBlock elements) and this thread's first element as (ROI, channel, bin).
  const unsigned int step_roi = kBlock / per_roi;
  const unsigned int step_channel = (kBlock % per_roi) / bins;
  const unsigned int step_bin = (kBlock % per_roi) % bins;
  const unsigned int first_roi = tid / per_roi;
  const unsigned int first_channel = (tid % per_roi) / bins;
  const unsigned int first_bin = (tid % per_roi) % bins;
  // The next round's batch indices, loaded a round ahead; as int (each is in [0, N) and
  // N < 2^31), which keeps the kernel within its register bound too.
  int next_image[kScan];
#pragma unroll
  for (int s = 0; s < kScan; ++s) {
    const i64 k = s * kBlock + tid;
    next_image[s] = k < K ? static_cast<int>(batch_index[k * bs0]) : -1;
  }
  for (i64 r0 = 0; r0 < K; r0 += kRound) {
    // This image's ROIs among the next kRound, in order, as rows [0, found) of round_rois.
    bool mine[kScan];
    unsigned int ballots[kScan];
#pragma unroll
    for (int s = 0; s < kScan; ++s) {
      mine[s] = next_image[s] == image;
      const i64 k_next = r0 + kRound + s * kBlock + tid;
      next_image[s] = k_next < K ? static_cast<int>(batch_index[k_next * bs0]) : -1;
      ballots[s] = __ballot_sync(0xffffffffu, mine[s]);
      if (lane == 0) warp_counts[s][warp] = __popc(ballots[s]);
    }
    __syncthreads();  // also orders the table and the zero fill (first round) before their use
    unsigned int found = 0;
#pragma unroll
    for (int s = 0; s < kScan; ++s) {
      unsigned int offset = found;
#pragma unroll
      for (unsigned int w = 0; w < kBlock / 32; ++w) {
        offset += w < warp ? warp_counts[s][w] : 0;
        found += warp_counts[s][w];
      }
      if (mine[s]) {
        const unsigned int below = __popc(ballots[s] & ((1u << lane) - 1u));
        round_rois[offset + below] = static_cast<int>(r0 + s * kBlock + tid);
      }
    }
    __syncthreads();
    unsigned int j = first_roi, c = first_channel, q = first_bin;
    for (unsigned int e0 = tid; e0 < found * per_roi; e0 += kPlanesUnroll * kBlock) {
      int a[kPlanesUnroll];
      A g[kPlanesUnroll];
      unsigned int plane[kPlanesUnroll];
#pragma unroll
      for (int u = 0; u < kPlanesUnroll; ++u) {
        a[u] = -1;
        g[u] = A(0);
        plane[u] = c;
        if (j < found) {
          const i64 k = round_rois[j];
          a[u] = __ldcs(argmax + ((k * C + c0 + c) * bins + q));  // read once: evict first
          g[u] = static_cast<A>(Elem<T>::value_of(
              grad_output[k * gs0 + (c0 + c) * gs1 + bin_offset[q]]));
        }
        q += step_bin;  // one step of the block, with carries
        c += step_channel;
        j += step_roi;
        if (q >= bins) {
          q -= bins;
          ++c;
        }
        if (c >= channels) {
          c -= channels;
          ++j;
        }
      }
#pragma unroll
      for (int u = 0; u < kPlanesUnroll; ++u) {
        if (a[u] >= 0) atomicAdd(planes + plane[u] * HW + a[u], g[u]);
      }
    }
    __syncthreads();  // before round_rois and warp_counts are overwritten
  }
  // Pointer steps: index arithmetic per element cost 0.11 ms on fpn-p2 (H100, measured).
  const unsigned int pixels = static_cast<unsigned int>(HW);  // plane_size is below 2^31
  const i64 step = kBlock * gi_pixel;
#pragma unroll 1
  for (unsigned int c = 0; c < channels; ++c) {  // one channel per block by default
    const A* plane = planes + c * pixels;
    T* __restrict__ out = grad_planes + c * gi_channel + tid * gi_pixel;
    for (unsigned int i = tid; i < pixels; i += kBlock, out += step) {
      *out = Rounded<T>::of(plane[i]);
    }
  }
}

#ifdef ROI_OPS_INSTANTIATE_ALL
// For offline compile checks (tools/check_compile.sh): instantiate every kernel that
// roi_ops_cupy/kernels.py asks NVRTC for. tests/test_backend_cupy.py checks that these two lists
// match kernels.FORWARD_PAIRS and kernels.BACKWARD_TYPES.
template <class T, class R>
const void* roi_ops_forward_kernels(int i) {
  const void* kernels[] = {
      reinterpret_cast<const void*>(&roi_pool_forward_plane<T, R, true>),
      reinterpret_cast<const void*>(&roi_pool_forward_plane<T, R, false>),
      reinterpret_cast<const void*>(&roi_pool_forward_chan<T, R, true>),
      reinterpret_cast<const void*>(&roi_pool_forward_chan<T, R, false>),
      reinterpret_cast<const void*>(&roi_pool_forward_unit<T, R, true>),
      reinterpret_cast<const void*>(&roi_pool_forward_unit<T, R, false>),
      reinterpret_cast<const void*>(&roi_pool_forward_cvec<T, R, true>),
      reinterpret_cast<const void*>(&roi_pool_forward_cvec<T, R, false>),
  };
  return kernels[i];
}

template <class T>
const void* roi_ops_backward_kernels(int i) {
  const void* kernels[] = {
      reinterpret_cast<const void*>(&roi_pool_backward_atomic<T>),
      reinterpret_cast<const void*>(&roi_pool_backward_planes<T, 256>),
      reinterpret_cast<const void*>(&roi_pool_backward_planes<T, 1024>),
  };
  return kernels[i];
}

#define ROI_OPS_FORWARD_PAIR(T, R) template const void* roi_ops_forward_kernels<T, R>(int);
#define ROI_OPS_BACKWARD_TYPE(T) template const void* roi_ops_backward_kernels<T>(int);

ROI_OPS_FORWARD_PAIR(roi_half, roi_half)
ROI_OPS_FORWARD_PAIR(roi_bf16, roi_bf16)
ROI_OPS_FORWARD_PAIR(float, float)
ROI_OPS_FORWARD_PAIR(double, double)
ROI_OPS_FORWARD_PAIR(roi_half, float)
ROI_OPS_FORWARD_PAIR(roi_bf16, float)

ROI_OPS_BACKWARD_TYPE(roi_half)
ROI_OPS_BACKWARD_TYPE(roi_bf16)
ROI_OPS_BACKWARD_TYPE(float)
ROI_OPS_BACKWARD_TYPE(double)
#endif
