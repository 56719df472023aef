// ---- roi_pool_forward_unit<T, R, kArgmax>: a unit W stride (NCHW contiguous and the like) ----
// The plane kernel's thread layout (a thread keeps one bin's geometry for every channel it
// visits), with the inner loop cut to a load, two compares and two selects per element: each
// thread reduces kUnitChannels channels at once (independent loads in flight, loop overhead
// shared), compares floats directly in PTX without flushing subnormals (`replaces`), starts from
// -inf at the bin's first element (so no "empty so far" test and no extra first load), steps
// along a row with unit stride, and moves between channels by pointer additions. Without an
// argmax it reduces with max.NaN (NaNMax). Outputs are stored evict-first.
namespace roi_ops_cuda {
constexpr int kUnitChannels = 4;  // channels per thread and step (2 for float64)
constexpr int kUnitBlocksPerSM = 4;  // 64 registers: four channels' pointers, maxima, argmaxes

// The unit kernel's layout: the plane layout, except that (with spread_tail) when one group's
// last warp would hold only a few bins (nb % 32 <= 16, e.g. 4 of 14 x 14 = 196), that warp's
// lanes spread over those bins' channels (`stride` of them interleaved) instead of idling: a
// warp's instructions cost the same with 4 lanes busy as with 32. Only inference spreads: with
// the argmax, that warp writes its 16-byte pieces of output rows long before the other warps
// write the rest of their sectors, which measured slower.
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
  // A zero or a NaN (rare) takes the bin's first element with its key: one test for all U.
  bool inexact = false;
#pragma unroll
  for (int u = 0; u < U; ++u) inexact |= !NaNMax<T>::exact(m[u]);
  if (!empty && inexact) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (exists[u] && !NaNMax<T>::exact(m[u])) {
        const T value = first_with_key<T>(planes + u * in_step, bin_h, bin_w, sH, 1,
                                          Elem<T>::key_of(NaNMax<T>::bits(m[u])));
        m[u] = NaNMax<T>::load(&value);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (exists[u]) store_result<T>(out, NaNMax<T>::bits(empty ? V(0) : m[u]));
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

namespace roi_ops_cuda {
// The ROI's geometry, computed once per block into dynamic shared memory (the launch plan sizes
// it: sizeof(UnitGeometry) + PH + PW int2 edges): its image (-1 for an invalid ROI), whether
// every bin is at most one pixel long, then the bin edges, rows then columns. The first PH + PW
// threads compute it, an edge each, instead of every thread computing the ROI's row, its two
// divisions and its bins' floors and ceilings; every thread reaches the barrier that follows.
struct UnitGeometry {
  i64 batch;
  int small_roi;
  int pad;
};

template <class R>
__device__ __forceinline__ const int2* unit_geometry(const R* __restrict__ row, const i64 rs1,
                                                     const i64 num_images,
                                                     const double spatial_scale, const i64 PH,
                                                     const i64 PW, const i64 H, const i64 W) {
  typedef typename Rois<R>::G G;
  UnitGeometry* const shared = reinterpret_cast<UnitGeometry*>(roi_dynamic_shared);
  int2* const edges = reinterpret_cast<int2*>(shared + 1);
  const i64 count = PH + PW;
  if (threadIdx.x < count) {
    const RoiGeometry<G> g = roi_geometry<R>(row, rs1, num_images, spatial_scale, PH, PW);
    const bool valid = g.batch >= 0;
    for (i64 i = threadIdx.x; i < count; i += blockDim.x) {
      edges[i] = i < PH ? bin_span<G>(i, g.bin_h, g.y1, H, valid)
                        : bin_span<G>(i - PH, g.bin_w, g.x1, W, valid);
    }
    if (threadIdx.x == 0) {
      shared->batch = g.batch;
      shared->small_roi = g.bin_h <= typename G::V(1) && g.bin_w <= typename G::V(1);
    }
  }
  __syncthreads();
  return edges;
}

// The unit kernel's work in block (k, channel blocks) of ROI k on one map (input, its sizes
// and strides, spatial_scale). num_images: N, or 0 for a ROI that pools nothing (every bin
// empty). Returns false in a thread with nothing to do (no barrier follows).
template <class T, class R, bool kArgmax>
__device__ __forceinline__ bool unit_roi(const T* __restrict__ input, const i64 num_images,
                                         const i64 C, const i64 H, const i64 W, const i64 sN,
                                         const i64 sC, const i64 sH, const R* __restrict__ row,
                                         const i64 rs1, const double spatial_scale, const i64 PH,
                                         const i64 PW, const i64 channels_per_block,
                                         T* __restrict__ output, int* __restrict__ argmax,
                                         const i64 k) {
  // float64 values and maxima take two registers each: half as many channels fit.
  constexpr int U = sizeof(T) == 8 ? kUnitChannels / 2 : kUnitChannels;
  const int2* const edges =
      unit_geometry<R>(row, rs1, num_images, spatial_scale, PH, PW, H, W);
  const UnitLayout layout(PH, PW, threadIdx.x, blockDim.x, !kArgmax);
  if (!layout.active) return false;
  const UnitGeometry* const shared = reinterpret_cast<const UnitGeometry*>(roi_dynamic_shared);
  const i64 batch = shared->batch;
  const i64 image = (batch >= 0 ? batch : 0) * sN;
  const int w_int = static_cast<int>(W);  // H * W < 2^31 (checked by roi_ops)
  const int groups = static_cast<int>(layout.stride);
  const int first_channel = static_cast<int>(layout.first_channel);
  // Between the channels a thread visits: `groups` channels apart.
  const i64 in_step = static_cast<i64>(groups) * sC;
  const i64 out_step = static_cast<i64>(groups) * layout.bins;
  // Bins at most one pixel long give every bin at most 2 x 2 elements (the exact test below
  // stays per bin); ROI-wide, so the block's threads agree on the path.
  const bool small_roi = shared->small_roi != 0;
  for (unsigned int q = layout.first_bin; q < layout.bins; q += layout.bin_step) {
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    const unsigned int pw = q - ph * static_cast<unsigned int>(PW);
    const int2 rows = edges[ph];
    const int2 cols = edges[PH + pw];
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
  return true;
}
}  // namespace roi_ops_cuda

// channels_per_block <= 2^24 (kernels.MAX_CHANNELS_PER_BLOCK; in practice a few thousand
// outputs per block), so the channel counters within a block are 32-bit; every offset into a
// tensor stays 64-bit. Arguments as the plane kernel's.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kUnitBlocksPerSM)
    roi_pool_forward_unit(ROI_OPS_MAP_PARAMETERS, const i64 channels_per_block,
                          ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  (void)sW;  // 1: the launch plan picks this kernel only for a unit W stride
  const i64 k = blockIdx.x;
  if (!unit_roi<T, R, kArgmax>(input, N, C, H, W, sN, sC, sH, rois + k * rs0, rs1, spatial_scale,
                               PH, PW, channels_per_block, output, argmax, k)) {
    return;
  }
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}

// ---- roi_pool_forward_unit_levels<T, R, kArgmax>: the unit kernel over pyramid levels --------
// Block (k, channel blocks) pools ROI k from the map of its level (common.cuh: LevelMaps); a ROI
// with no level pools nothing. Every level has a unit W stride. Arguments: the L maps, the
// (K,) int64 levels (row stride ls0), then as the unit kernel's without the map's.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kUnitBlocksPerSM)
    roi_pool_forward_unit_levels(ROI_OPS_LEVELS_PARAMETERS, const i64 channels_per_block,
                                 ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  const i64 k = blockIdx.x;
  const int level = roi_level(levels, ls0, k, L);
  const LevelMap<T>& map = maps.level[level < 0 ? 0 : level];
  if (!unit_roi<T, R, kArgmax>(map.input, level < 0 ? 0 : N, C, map.H, map.W, map.sN, map.sC,
                               map.sH, rois + k * rs0, rs1, map.spatial_scale, PH, PW,
                               channels_per_block, output, argmax, k)) {
    return;
  }
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}
