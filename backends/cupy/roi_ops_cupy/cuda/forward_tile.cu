// ---- roi_pool_forward_tile<T, R, kArgmax>: a unit W stride, windows staged per warp --------
// For inputs with a unit W stride (NCHW contiguous and the like). A block pools one ROI for a
// block of channels, as the unit kernel, but divides the work otherwise: the unit kernel's lanes
// each scan their own bin in global memory, so that one load instruction reads short pieces of
// many rows (many sectors and L1 wavefronts per request). Here the block first cuts the ROI's
// window (the rectangle its bins cover) into strips of whole bin rows that fit a tile, and
// writes every bin's place in its strip into a shared-memory table, once per ROI. Then each warp
// takes kTileChannels channels at a time and, strip by strip, copies the strip of each channel
// into the warp's own shared-memory tile, consecutive lanes on consecutive elements in row-major
// order (a load instruction reads a few whole row pieces), and reduces the strip's bins from the
// tile, consecutive lanes on consecutive bins (coalesced stores), each lane for all the warp's
// channels at once (the loop and the table read shared by them), with the unit kernel's compare
// and select (or max.NaN without argmax). A ROI one of whose bin rows does not fit a tile takes
// the unit kernel's path (forward_unit.cu) in the same block.
//
// Arguments as the unit kernel's, with tile_elements (per warp) after channels_per_block. Blocks
// of kThreads; dynamic shared memory: planning.tile_shared_bytes.
namespace roi_ops_cuda {
constexpr int kTileWarps = kThreads / 32;
constexpr int kTileBlocksPerSM = 4;  // 64 registers: the unit kernel's path shares the kernel
constexpr int kTileLoads = 1;        // elements per lane and channel in flight while copying

// A warp's channels at a time (their strips share its tile): float64 holds half as many.
template <class T>
struct TileShape {
  static constexpr int kChannels = sizeof(T) == 8 ? 2 : 4;
};

// One bin: its first element in its strip's tile (row-major, rows of the window's width) and
// in the map (the argmax, h * W + w), and its size (0 x 0 for an empty bin).
struct TileBin {
  int local;
  int first;
  int bin_h, bin_w;
};

// A strip of bin rows: its rows [row0, row0 + rows) of the window, its bins [first_bin,
// end_bin).
struct TileStrip {
  int row0, rows;
  int first_bin, end_bin;
};

// The block's shared memory: the bin table, the strips, the scratch of the strip plan (each bin
// row's span and its strip's first row), the strip count, then the warps' tiles (16-byte
// aligned). planning.tile_shared_bytes counts the same.
struct TileShared {
  TileBin* table;
  TileStrip* strips;
  int2* spans;
  int* strip_row;
  int* count;
  unsigned char* tiles;
  __device__ __forceinline__ TileShared(i64 PH, i64 PW) {
    table = reinterpret_cast<TileBin*>(roi_dynamic_shared);
    strips = reinterpret_cast<TileStrip*>(table + PH * PW);
    spans = reinterpret_cast<int2*>(strips + PH);
    strip_row = reinterpret_cast<int*>(spans + PH);
    count = strip_row + PH;
    const i64 head = reinterpret_cast<unsigned char*>(count + 1) - roi_dynamic_shared;
    tiles = roi_dynamic_shared + (head + 15) / 16 * 16;
  }
};

// The window of a ROI: rows [y0, y0 + rows) and columns [x0, x0 + cols) of its map, the union
// of its bins (bin edges grow with the bin index along each axis); 0 x 0 when every bin is empty.
struct TileWindow {
  int y0, x0, rows, cols;
};

template <class G>
__device__ __forceinline__ TileWindow tile_window(const RoiGeometry<G>& g, i64 PH, i64 PW, i64 H,
                                                  i64 W) {
  const bool valid = g.batch >= 0;
  const int2 top = bin_span<G>(0, g.bin_h, g.y1, H, valid);
  const int2 bottom = bin_span<G>(PH - 1, g.bin_h, g.y1, H, valid);
  const int2 left = bin_span<G>(0, g.bin_w, g.x1, W, valid);
  const int2 right = bin_span<G>(PW - 1, g.bin_w, g.x1, W, valid);
  TileWindow w;
  w.y0 = top.x;
  w.x0 = left.x;
  w.rows = bottom.y > top.x ? bottom.y - top.x : 0;
  w.cols = right.y > left.x ? right.y - left.x : 0;
  if (w.rows == 0 || w.cols == 0) w.rows = w.cols = 0;
  return w;
}

// Cuts the window into strips of whole bin rows, each at most `capacity` elements (a warp's tile
// over its channels), greedily from the top (thread 0; the spans are in shared memory). The
// count, or -1 when a bin row alone does not fit.
__device__ __forceinline__ int plan_tile_strips(const TileShared& s, const TileWindow& w, int PH,
                                                int PW, i64 capacity) {
  int count = 0;
  int ph = 0;
  while (ph < PH) {
    const int top = s.spans[ph].x;
    if (static_cast<i64>(s.spans[ph].y - top) * w.cols > capacity) return -1;
    const int first = ph;
    while (ph < PH && static_cast<i64>(s.spans[ph].y - top) * w.cols <= capacity) {
      s.strip_row[ph] = top;
      ++ph;
    }
    TileStrip strip;
    strip.row0 = top - w.y0;
    strip.rows = s.spans[ph - 1].y - top;
    strip.first_bin = first * PW;
    strip.end_bin = ph * PW;
    s.strips[count++] = strip;
  }
  return count;
}

// The block's bin table (every thread; a barrier follows in the caller).
template <class G>
__device__ __forceinline__ void fill_tile_bins(const TileShared& s, const RoiGeometry<G>& g,
                                               const TileWindow& w, i64 PH, i64 PW, i64 H,
                                               i64 W) {
  const bool valid = g.batch >= 0;
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  for (unsigned int q = threadIdx.x; q < bins; q += kThreads) {
    const unsigned int ph = q / static_cast<unsigned int>(PW);
    const unsigned int pw = q - ph * static_cast<unsigned int>(PW);
    const int2 rows = bin_span<G>(ph, g.bin_h, g.y1, H, valid);
    const int2 cols = bin_span<G>(pw, g.bin_w, g.x1, W, valid);
    TileBin bin;
    bin.bin_h = rows.y - rows.x;
    bin.bin_w = cols.y - cols.x;
    if (bin.bin_h <= 0 || bin.bin_w <= 0) bin.bin_h = bin.bin_w = 0;
    const bool empty = bin.bin_h == 0;
    bin.local = empty ? 0 : (rows.x - s.strip_row[ph]) * w.cols + (cols.x - w.x0);
    bin.first = rows.x * static_cast<int>(W) + cols.x;  // H * W < 2^31 (checked by roi_ops)
    s.table[q] = bin;
  }
}

// One bin of the warp's U channels from their tiles (channel u's at tile + u * area): each
// existing channel's value (and argmax) stored at out + u * bins (arg likewise). kSmall: the bin
// has at most 2 x 2 elements; four reads per channel and no loop (a missing second row or
// column re-reads the first: a re-read element never replaces the maximum).
template <class T, int U, bool kArgmax, bool kSmall>
__device__ __forceinline__ void tile_bin(const T* __restrict__ tile, int area, int tile_w,
                                         const TileBin& bin, int w_int, const bool (&exists)[U],
                                         T* __restrict__ out, int* __restrict__ arg,
                                         unsigned int bins) {
  if (bin.bin_h == 0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (exists[u]) {
        store_result<T>(out + u * bins, Work<T>::out(typename Work<T>::V(0)));
        if (kArgmax) store_result<int>(arg + u * bins, -1);
      }
    }
    return;
  }
  const int down = bin.bin_h > 1 ? tile_w : 0;
  const int right = bin.bin_w > 1 ? 1 : 0;
  if constexpr (!kArgmax && NaNMax<T>::kEnabled) {
    typedef typename NaNMax<T>::V V;
    V m[U];
#pragma unroll
    for (int u = 0; u < U; ++u) m[u] = NaNMax<T>::lowest();
    if constexpr (kSmall) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const T* __restrict__ corner = tile + (bin.local + u * area);
        const V upper = NaNMax<T>::max(NaNMax<T>::load(corner), NaNMax<T>::load(corner + right));
        const V lower = NaNMax<T>::max(NaNMax<T>::load(corner + down),
                                       NaNMax<T>::load(corner + down + right));
        m[u] = NaNMax<T>::max(upper, lower);
      }
    } else {
      int line = bin.local;
      for (int i = 0; i < bin.bin_h; ++i) {
        for (int j = 0; j < bin.bin_w; ++j) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            m[u] = NaNMax<T>::max(m[u], NaNMax<T>::load(tile + (line + u * area + j)));
          }
        }
        line += tile_w;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (exists[u]) {
        T value = NaNMax<T>::bits(m[u]);
        if (!NaNMax<T>::exact(m[u])) {
          value = first_with_key<T>(tile + (bin.local + u * area), bin.bin_h, bin.bin_w, tile_w,
                                    1, Elem<T>::key_of(value));
        }
        store_result<T>(out + u * bins, value);
      }
    }
  } else {
    typedef typename Work<T>::V V;
    V best[U];
    int at[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      best[u] = Work<T>::lowest();
      at[u] = 0;
    }
    if constexpr (kSmall) {
      const int at_down = bin.bin_h > 1 ? w_int : 0;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = i == 0 ? 0 : at_down;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const T* __restrict__ line = tile + (bin.local + u * area + (i == 0 ? 0 : down));
          const V left_value = Work<T>::in(line[0]);
          const V right_value = Work<T>::in(line[right]);
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
    } else {
      int row = 0;  // i * W: the argmax offset of the current row
      int line = bin.local;
      for (int i = 0; i < bin.bin_h; ++i) {
        for (int j = 0; j < bin.bin_w; ++j) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const V v = Work<T>::in(tile[line + u * area + j]);
            if (replaces(v, best[u])) {
              best[u] = v;
              at[u] = row + j;
            }
          }
        }
        line += tile_w;
        row += w_int;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (exists[u]) {
        T value = Work<T>::out(best[u]);
        if (!Work<T>::kKeepsNaN && !(best[u] == best[u])) {  // the NaN's payload was lost
          value = first_with_key<T>(tile + (bin.local + u * area), bin.bin_h, bin.bin_w, tile_w,
                                    1, Elem<T>::key_of(value));
        }
        store_result<T>(out + u * bins, value);
        if (kArgmax) store_result<int>(arg + u * bins, bin.first + at[u]);
      }
    }
  }
}

// The warp's channels of every channel block of the ROI, U at a time: strip by strip, copy the
// strip of each channel into the warp's tile and reduce the strip's bins. window: the window's
// first element in channel 0 of its image.
template <class T, bool kArgmax, bool kSmall>
__device__ __forceinline__ void tile_channels(const T* __restrict__ window, const TileWindow& w,
                                              const TileShared& s, int strip_count, T* tile,
                                              i64 C, i64 channels_per_block, i64 sC, i64 sH,
                                              i64 W, i64 PH, i64 PW, T* __restrict__ output,
                                              int* __restrict__ argmax, i64 k) {
  constexpr int U = TileShape<T>::kChannels;
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int cols = w.cols > 0 ? w.cols : 1;
  // Lane's first element (row r, column c of a strip) and the step of 32 elements: down `down`
  // rows and right `right` columns, one row more when the column passes the window's width.
  const int r = lane / cols;
  const int c = lane - r * cols;
  const int down = 32 / cols;
  const int right = 32 - down * cols;
  const i64 step = down * sH + right;
  const i64 wrap = sH - cols;
  const unsigned int bins = static_cast<unsigned int>(PH * PW);
  const int w_int = static_cast<int>(W);
  for (i64 c0 = blockIdx.y * channels_per_block; c0 < C; c0 += gridDim.y * channels_per_block) {
    const int channels =
        static_cast<int>(C - c0 < channels_per_block ? C - c0 : channels_per_block);
    for (int cl = warp * U; cl < channels; cl += kTileWarps * U) {
      bool exists[U];
#pragma unroll
      for (int u = 0; u < U; ++u) exists[u] = cl + u < channels;
      const T* __restrict__ source = window + (c0 + cl) * sC;
      const i64 out_at = (k * C + c0 + cl) * bins;
      for (int si = 0; si < strip_count; ++si) {
        const TileStrip strip = s.strips[si];
        const int area = strip.rows * w.cols;
        i64 offset = strip.row0 * sH + r * sH + c;
        int column = c;
        for (int e = lane; e < area; e += 32 * kTileLoads) {
          T v[U][kTileLoads];
#pragma unroll
          for (int l = 0; l < kTileLoads; ++l) {
            const bool inside = e + 32 * l < area;
#pragma unroll
            for (int u = 0; u < U; ++u) {
              if (inside && exists[u]) v[u][l] = source[u * sC + offset];
            }
            offset += step;
            column += right;
            if (column >= cols) {
              column -= cols;
              offset += wrap;
            }
          }
#pragma unroll
          for (int l = 0; l < kTileLoads; ++l) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
              if (e + 32 * l < area && exists[u]) tile[u * area + e + 32 * l] = v[u][l];
            }
          }
        }
        __syncwarp();
        for (unsigned int q = strip.first_bin + lane; q < static_cast<unsigned int>(strip.end_bin);
             q += 32) {
          tile_bin<T, U, kArgmax, kSmall>(tile, area, w.cols, s.table[q], w_int, exists,
                                          output + out_at + q,
                                          kArgmax ? argmax + out_at + q : nullptr, bins);
        }
        __syncwarp();
      }
    }
  }
}

// The unit kernel's path, out of line: inlined, its registers and the tile path's would share
// the kernel's 64 and spill.
template <class T, class R, bool kArgmax>
__device__ __noinline__ bool tile_unit_path(const T* __restrict__ input, const i64 num_images,
                                            const i64 C, const i64 H, const i64 W, const i64 sN,
                                            const i64 sC, const i64 sH, const R* __restrict__ row,
                                            const i64 rs1, const double spatial_scale,
                                            const i64 PH, const i64 PW,
                                            const i64 channels_per_block, T* __restrict__ output,
                                            int* __restrict__ argmax, const i64 k) {
  return unit_roi<T, R, kArgmax>(input, num_images, C, H, W, sN, sC, sH, row, rs1, spatial_scale,
                                 PH, PW, channels_per_block, output, argmax, k);
}

// The tile kernel's work in block (k, channel blocks) of ROI k on one map; the unit kernel's
// path when a bin row does not fit a tile. Returns false in a thread with nothing to do.
template <class T, class R, bool kArgmax>
__device__ __forceinline__ bool tile_roi(const T* __restrict__ input, const i64 num_images,
                                         const i64 C, const i64 H, const i64 W, const i64 sN,
                                         const i64 sC, const i64 sH, const R* __restrict__ row,
                                         const i64 rs1, const double spatial_scale, const i64 PH,
                                         const i64 PW, const i64 channels_per_block,
                                         const i64 tile_elements, T* __restrict__ output,
                                         int* __restrict__ argmax, const i64 k) {
  typedef typename Rois<R>::G G;
  constexpr int U = TileShape<T>::kChannels;
  const RoiGeometry<G> g = roi_geometry<R>(row, rs1, num_images, spatial_scale, PH, PW);
  const TileWindow w = tile_window<G>(g, PH, PW, H, W);
  const TileShared s(PH, PW);
  const bool valid = g.batch >= 0;
  for (int ph = static_cast<int>(threadIdx.x); ph < PH; ph += kThreads) {
    s.spans[ph] = bin_span<G>(ph, g.bin_h, g.y1, H, valid);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    *s.count = plan_tile_strips(s, w, static_cast<int>(PH), static_cast<int>(PW),
                                tile_elements / U);
  }
  __syncthreads();
  const int strip_count = *s.count;
  if (strip_count < 0) {
    return tile_unit_path<T, R, kArgmax>(input, num_images, C, H, W, sN, sC, sH, row, rs1,
                                         spatial_scale, PH, PW, channels_per_block, output,
                                         argmax, k);
  }
  fill_tile_bins<G>(s, g, w, PH, PW, H, W);
  __syncthreads();
  T* const tile = reinterpret_cast<T*>(s.tiles) + (threadIdx.x >> 5) * tile_elements;
  const i64 image = valid ? g.batch : 0;
  const T* __restrict__ window = input + image * sN + w.y0 * sH + w.x0;
  // Bins at most one pixel long give every bin at most 2 x 2 elements; ROI-wide, so the block's
  // warps agree on the path.
  if (g.bin_h <= typename G::V(1) && g.bin_w <= typename G::V(1)) {
    tile_channels<T, kArgmax, true>(window, w, s, strip_count, tile, C, channels_per_block, sC,
                                    sH, W, PH, PW, output, argmax, k);
  } else {
    tile_channels<T, kArgmax, false>(window, w, s, strip_count, tile, C, channels_per_block, sC,
                                     sH, W, PH, PW, output, argmax, k);
  }
  return true;
}
}  // namespace roi_ops_cuda

template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kTileBlocksPerSM)
    roi_pool_forward_tile(ROI_OPS_MAP_PARAMETERS, const i64 channels_per_block,
                          const i64 tile_elements, ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  (void)sW;  // 1: the launch plan picks this kernel only for a unit W stride
  const i64 k = blockIdx.x;
  if (!tile_roi<T, R, kArgmax>(input, N, C, H, W, sN, sC, sH, rois + k * rs0, rs1, spatial_scale,
                               PH, PW, channels_per_block, tile_elements, output, argmax, k)) {
    return;
  }
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}

// ---- roi_pool_forward_tile_levels<T, R, kArgmax>: the tile kernel over pyramid levels --------
// Block (k, channel blocks) pools ROI k from the map of its level (common.cuh: LevelMaps); a ROI
// with no level pools nothing. Every level has a unit W stride. Arguments as the unit levels
// kernel's, with tile_elements after channels_per_block.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kTileBlocksPerSM)
    roi_pool_forward_tile_levels(ROI_OPS_LEVELS_PARAMETERS, const i64 channels_per_block,
                                 const i64 tile_elements, ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  const i64 k = blockIdx.x;
  const int level = roi_level(levels, ls0, k, L);
  const LevelMap<T>& map = maps.level[level < 0 ? 0 : level];
  if (!tile_roi<T, R, kArgmax>(map.input, level < 0 ? 0 : N, C, map.H, map.W, map.sN, map.sC,
                               map.sH, rois + k * rs0, rs1, map.spatial_scale, PH, PW,
                               channels_per_block, tile_elements, output, argmax, k)) {
    return;
  }
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}
