// The ROI geometry that every kernel family shares (after common.cuh): the contract's
// arithmetic in the ROIs' dtype (every operation rounded as C++ rounds a variable of that type),
// a ROI's image and bins, its bins' row and column spans, and the bad-ROI log.
namespace roi_ops_cuda {

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

// The bits of float64(v) for a value of a binary format with `bits` mantissa bits and exponent
// bias `bias` (its sign, biased exponent field and mantissa field given apart; an all-ones
// exponent is passed as -1), computed on the integer bits so that no flushing (-ftz) or NaN
// canonicalisation can change them: a NaN keeps its sign and payload and becomes quiet, as the
// CPU's float-to-double conversions do.
__device__ __forceinline__ unsigned long long float64_bits_of(unsigned int sign, int exponent,
                                                              unsigned long long mantissa,
                                                              int bits, int bias) {
  const unsigned long long top = static_cast<unsigned long long>(sign) << 63;
  const unsigned long long all_ones = 0x7ff0000000000000ULL;
  if (exponent < 0) {  // inf, or NaN (made quiet)
    return mantissa == 0 ? top | all_ones
                         : top | all_ones | (mantissa | 1ULL << (bits - 1)) << (52 - bits);
  }
  if (exponent == 0) {  // zero, or a subnormal: mantissa * 2^(1 - bias - bits), normalised
    if (mantissa == 0) return top;
    int lead = bits - 1;
    while (!((mantissa >> lead) & 1ULL)) --lead;
    const long long field = lead + 1 - bias - bits + 1023;
    return top | static_cast<unsigned long long>(field) << 52 |
           ((mantissa << (52 - lead)) & 0xfffffffffffffULL);
  }
  return top | static_cast<unsigned long long>(exponent - bias + 1023) << 52 |
         mantissa << (52 - bits);
}

// The geometry dtype of each rois dtype (bfloat16 rois use float32), how to read one value, and
// the float64 bits of one value (for the bad-ROI log).
template <class R>
struct Rois;
template <>
struct Rois<roi_half> {
  typedef GeomHalf G;
  static __device__ __forceinline__ float load(roi_half r) { return half_to_float(r.bits); }
  static __device__ __forceinline__ unsigned long long float64_bits(roi_half r) {
    const int exponent = (r.bits >> 10) & 0x1f;
    return float64_bits_of(r.bits >> 15, exponent == 0x1f ? -1 : exponent, r.bits & 0x3ffu, 10, 15);
  }
};
template <>
struct Rois<float> {
  typedef GeomFloat G;
  static __device__ __forceinline__ float load(float r) { return r; }
  static __device__ __forceinline__ unsigned long long float64_bits(float r) {
    const unsigned int u = __float_as_uint(r);
    const int exponent = (u >> 23) & 0xff;
    return float64_bits_of(u >> 31, exponent == 0xff ? -1 : exponent, u & 0x7fffffu, 23, 127);
  }
};
template <>
struct Rois<roi_bf16> {
  typedef GeomFloat G;
  static __device__ __forceinline__ float load(roi_bf16 r) { return bf16_to_float(r.bits); }
  static __device__ __forceinline__ unsigned long long float64_bits(roi_bf16 r) {
    return Rois<float>::float64_bits(bf16_to_float(r.bits));
  }
};
template <>
struct Rois<double> {
  typedef GeomDouble G;
  static __device__ __forceinline__ double load(double r) { return r; }
  static __device__ __forceinline__ unsigned long long float64_bits(double r) {
    return static_cast<unsigned long long>(__double_as_longlong(r));
  }
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

// Whether the ROI whose five values start at `row` is valid: every value finite in the geometry
// dtype and trunc(batch) in [0, N) (what roi_geometry decides, on its own).
template <class R>
__device__ __forceinline__ bool roi_valid(const R* __restrict__ row, i64 stride, i64 num_images) {
  typedef typename Rois<R>::G G;
  bool valid = true;
#pragma unroll 1
  for (int j = 0; j < 5; ++j) valid = valid && G::finite(Rois<R>::load(row[j * stride]));
  const double batch = trunc(static_cast<double>(Rois<R>::load(row[0])));
  return valid && batch >= 0.0 && batch < static_cast<double>(num_images);
}

// The bad-ROI log (roi_ops/bad_rois.py): for an invalid row k, atomic minimums of k << 32
// joined with each 32-bit half of its five values' float64 bits (slots 0 to 9), and with N
// (slot 10). Keys of an earlier row are smaller, so the log ends up holding the first invalid
// row whatever order the blocks run in. `report_bad_roi` is called by every thread of a kernel
// with one ROI per block row, last thing (nothing else is live then, so it costs the kernel's
// loops no registers): the first thread of ROI k's first channel block (grid (K, channel
// blocks)) checks the row again and records it; a null log records nothing. That thread never
// leaves a kernel early.
template <class R>
__device__ __forceinline__ void record_bad_row(long long* __restrict__ log,
                                               const R* __restrict__ row, i64 stride, i64 k,
                                               i64 num_images) {
  const long long key = static_cast<long long>(k) << 32;
#pragma unroll 1
  for (int j = 0; j < 5; ++j) {  // one value at a time: few registers (see report_bad_roi)
    const unsigned long long bits = Rois<R>::float64_bits(row[j * stride]);
    atomicMin(log + 2 * j, key | static_cast<long long>(bits & 0xffffffffULL));
    atomicMin(log + 2 * j + 1, key | static_cast<long long>(bits >> 32));
  }
  atomicMin(log + 10, key | static_cast<long long>(num_images));
}
template <class R>
__device__ __forceinline__ void record_if_bad(const R* __restrict__ rois, i64 rs0, i64 rs1,
                                              i64 num_images, long long* __restrict__ log) {
  const i64 k = block_column();
  const R* __restrict__ row = rois + k * rs0;
  if (!roi_valid<R>(row, rs1, num_images)) record_bad_row<R>(log, row, rs1, k, num_images);
}
template <class R>
__device__ __forceinline__ void report_bad_roi(const R* __restrict__ rois, i64 rs0, i64 rs1,
                                               i64 num_images, long long* __restrict__ log) {
  // Lean, and on thread and block indices read afresh: nothing the kernel computed before is
  // reused here, so nothing stays live through the kernel's loops for it (a kernel at its
  // register bound would spill otherwise).
  if (log != nullptr && first_thread_of_row_0()) {
    record_if_bad<R>(rois, rs0, rs1, num_images, log);
  }
}

// The backward's image of ROI k: trunc(rois[k, 0]) clamped into [0, N), as
// roi_ops.backend.RoIPoolBackwardProblem.batch_index (NaN gives 0). Only ROIs whose argmax is
// not all -1 (valid ones, whose index is already in range) add gradients.
template <class R>
__device__ __forceinline__ int roi_image(const R* __restrict__ rois, i64 rs0, i64 k,
                                         i64 num_images) {
  const double v = static_cast<double>(Rois<R>::load(rois[k * rs0]));
  if (!(v >= 1.0)) return 0;
  if (v >= static_cast<double>(num_images)) return static_cast<int>(num_images - 1);
  return static_cast<int>(v);  // truncates; N < 2^31
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

// Shared-memory edge cache: rows [0, PH) then columns [PH, PH + PW). Filled by the whole block
// of `count` threads (a barrier follows).
template <class G>
__device__ __forceinline__ void fill_edge_cache(int2* edges, const RoiGeometry<G>& g, i64 PH,
                                                i64 PW, i64 H, i64 W, int tid) {
  const bool valid = g.batch >= 0;
  const int count = static_cast<int>(PH + PW);  // cached only when small (launch plan)
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
}  // namespace roi_ops_cuda
