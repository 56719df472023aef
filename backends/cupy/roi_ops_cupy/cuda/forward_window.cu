// ---- roi_pool_forward_window<T, R, kArgmax>: each ROI's window staged in shared memory -------
// For a unit W stride (NCHW contiguous and the like). The unit kernel's loads wait on L2 with a
// few per thread in flight (each holds a register until its data comes); here a block copies
// the rows of its ROI's window, for as many channels as a buffer holds, into shared memory with
// asynchronous copies (no register waits, so every thread issues all its copies of a tile at
// once, and the next tile's copies run while this one is reduced), then reduces every bin from
// shared memory in the plane layout (a thread keeps one bin's edges for every channel it
// visits). The window is read from L2 once per channel instead of once per bin that covers it.
//
// Tiles: when a channel's window fits in a buffer, as many channels as fit with every row of
// bins; otherwise one channel and a strip of rows of bins at a time; a row of bins taller than
// a buffer is reduced straight from global memory. A copy moves one word: 4 bytes (8 for
// float64). 16-bit rows are copied as the aligned words that cover them, so a row that starts
// at an odd element starts one element into its first word in shared memory; a word that would
// reach past the tensor's last element is copied as its one element.
//
// Arguments as the unit kernel's, then buffer_words (4-byte words in each of the two buffers).
// Dynamic shared memory: the (PH + PW) bin edges (int2, padded to 16 bytes), then the buffers.
// Blocks of whole groups of PH * PW threads (planning.plane_threads), at most kThreads.
namespace roi_ops_cuda {
constexpr int kWindowBlocksPerSM = 4;
constexpr int kWindowChannels = 2;  // channels per thread and step of the reduction
constexpr int kWindowPlanBytes = 128;  // the block's WindowPlan in shared memory, padded

// One tile: channels [channel, channel + channels), rows of bins [ph0, ph1), which read map rows
// [row0, row0 + rows); staged, or read from global memory.
struct WindowTile {
  int channel, channels, ph0, ph1, row0, rows;
  bool staged;
};

// What every thread of a block knows of its ROI and channel block.
template <class T>
struct WindowPlan {
  static constexpr int kWordBytes = sizeof(T) == 8 ? 8 : 4;
  static constexpr int kPerWord = kWordBytes / static_cast<int>(sizeof(T));  // 1, or 2 (16-bit)
  const T* __restrict__ image;  // the ROI's image, channel 0
  const unsigned char* end;     // one past the tensor's last byte
  i64 sC, sH;
  const int2* edges;  // rows of bins [0, PH), then columns of bins [PH, PH + PW)
  int PH, PW, W;
  int col0, words;            // the window's first column, words per staged row
  int row0, rows;             // the window's rows
  int per_tile;               // channels per tile when a window fits in a buffer, else 0
  int buffer_words;

  // Rows of bins [ph0, ph1) of one channel: as many as fit in a buffer from ph0.
  __device__ __forceinline__ WindowTile strip(int channel, int ph0) const {
    WindowTile t;
    t.channel = channel;
    t.channels = 1;
    t.ph0 = ph0;
    t.ph1 = ph0 + 1;
    const int first = edges[ph0].x;
    while (t.ph1 < PH && (edges[t.ph1].y - first) * words <= buffer_words) ++t.ph1;
    t.row0 = first;
    t.rows = edges[t.ph1 - 1].y - first;
    t.staged = t.rows > 0 && t.rows * words <= buffer_words;  // (a window has words)
    return t;
  }
  // The first tile of channels [channel, channel_end).
  __device__ __forceinline__ WindowTile first(int channel, int channel_end) const {
    if (per_tile == 0) return strip(channel, 0);
    WindowTile t;
    t.channel = channel;
    t.channels = per_tile < channel_end - channel ? per_tile : channel_end - channel;
    t.ph0 = 0;
    t.ph1 = PH;
    t.row0 = row0;
    t.rows = rows;
    t.staged = rows > 0 && words > 0;
    return t;
  }
  // The tile after t; its channels are empty after the last one.
  __device__ __forceinline__ WindowTile next(const WindowTile& t, int channel_end) const {
    if (per_tile == 0 && t.ph1 < PH) return strip(t.channel, t.ph1);
    WindowTile n = first(t.channel + t.channels, channel_end);
    if (n.channel >= channel_end) n.channels = 0;
    return n;
  }
  // Address of element (row, col0) of channel c (offsets from image; col0 may be negative only
  // for an empty window, which is never read).
  __device__ __forceinline__ const T* row_start(int c, int row) const {
    return image + c * sC + row * sH + col0;
  }
};

// Copies the staged rows of tile t into `buffer` (every thread of the block; no wait).
template <class T>
__device__ __forceinline__ void window_stage(const WindowPlan<T>& plan, const WindowTile& t,
                                             unsigned char* buffer) {
  typedef WindowPlan<T> P;
  if (!t.staged || t.channels <= 0 || t.rows <= 0 || plan.words <= 0) return;
  const unsigned int words = static_cast<unsigned int>(plan.words);
  const unsigned int rows = static_cast<unsigned int>(t.rows);
  const unsigned int total = static_cast<unsigned int>(t.channels) * rows * words;
  const unsigned int step = blockDim.x;
  // (channel, row, word) of element e of the tile, walked with carries (no division per copy).
  const unsigned int step_w = step % words, step_rows = step / words;
  const unsigned int step_c = step_rows / rows, step_r = step_rows % rows;
  unsigned int w = threadIdx.x % words, r = (threadIdx.x / words) % rows;
  unsigned int c = threadIdx.x / words / rows;
#pragma unroll 1
  for (unsigned int e = threadIdx.x; e < total; e += step) {
    const T* start = plan.row_start(t.channel + static_cast<int>(c), t.row0 + static_cast<int>(r));
    unsigned char* to = buffer + e * P::kWordBytes;
    if constexpr (P::kPerWord == 1) {
      copy_async<P::kWordBytes>(to, start + w);
    } else {
      const unsigned char* word =
          reinterpret_cast<const unsigned char*>(reinterpret_cast<unsigned long long>(start) &
                                                 ~3ULL) + 4 * w;
      if (word + 4 <= plan.end) {
        copy_async<4>(to, word);
      } else {  // the tensor's last element opens this word
        *reinterpret_cast<unsigned short*>(to) = *reinterpret_cast<const unsigned short*>(word);
      }
    }
    w += step_w;
    r += step_r;
    c += step_c;
    if (w >= words) {
      w -= words;
      ++r;
    }
    if (r >= rows) {
      r -= rows;
      ++c;
    }
  }
}

// The rows of one bin in kWindowChannels channels, staged: element (u, i, j) lies at
// buffer[row[u] + i * pitch + j] (32-bit offsets), plus for 16-bit rows their parity in the
// word (odd[u] for the bin's first row, flipping from row to row when the map's row stride is
// odd).
template <class T>
struct StagedRows {
  const T* buffer;
  unsigned int row[kWindowChannels];
  unsigned int pitch;
  unsigned int odd[kWindowChannels];
  unsigned int flip;
  __device__ __forceinline__ const T* at(int u, int i) const {
    unsigned int offset = row[u] + static_cast<unsigned int>(i) * pitch;
    if constexpr (WindowPlan<T>::kPerWord == 2) offset += odd[u] ^ (flip & i);
    return buffer + offset;
  }
};

// The same rows read from global memory (a row of bins taller than a buffer).
template <class T>
struct GlobalRows {
  const T* row[kWindowChannels];
  i64 stride;
  __device__ __forceinline__ const T* at(int u, int i) const { return row[u] + i * stride; }
};

// The first element of a non-empty bin whose key equals `key` (see first_with_key): bin_h rows
// from `first`, `pitch` elements apart, each shifted by its parity (16-bit staged rows).
template <class T>
__device__ __noinline__ T window_first_with_key(const T* first, i64 pitch, unsigned int odd,
                                                unsigned int flip, int bin_h, int bin_w,
                                                typename Elem<T>::key key) {
  for (int i = 0; i < bin_h; ++i) {
    const T* line = first + i * pitch + (odd ^ (flip & i));
    for (int j = 0; j < bin_w; ++j) {
      if (Elem<T>::key_of(line[j]) == key) return line[j];
    }
  }
  return first[odd];  // unreachable: the maximum is one of the bin's elements
}
template <class T>
__device__ __forceinline__ T window_first(const StagedRows<T>& rows, int u, int bin_h,
                                          int bin_w, typename Elem<T>::key key) {
  const bool pairs = WindowPlan<T>::kPerWord == 2;
  return window_first_with_key<T>(rows.buffer + rows.row[u], rows.pitch, pairs ? rows.odd[u] : 0,
                                  pairs ? rows.flip : 0, bin_h, bin_w, key);
}
template <class T>
__device__ __forceinline__ T window_first(const GlobalRows<T>& rows, int u, int bin_h, int bin_w,
                                          typename Elem<T>::key key) {
  return window_first_with_key<T>(rows.row[u], rows.stride, 0, 0, bin_h, bin_w, key);
}

// One bin of kWindowChannels channels (channel u exists when `exists[u]`), stored at out[u *
// out_step] (arg likewise). Rows: StagedRows or GlobalRows.
template <class T, bool kArgmax, class Rows>
__device__ __forceinline__ void window_bin(const Rows& rows, const bool (&exists)[kWindowChannels],
                                           int bin_h, int bin_w, int w_int, int first_index,
                                           T* __restrict__ out, int* __restrict__ arg,
                                           i64 out_step) {
  constexpr int U = kWindowChannels;
  const bool empty = bin_h <= 0 || bin_w <= 0;
  if constexpr (!kArgmax && NaNMax<T>::kEnabled) {
    typedef typename NaNMax<T>::V V;
    V m[U];
#pragma unroll
    for (int u = 0; u < U; ++u) m[u] = NaNMax<T>::lowest();
#pragma unroll 1
    for (int i = 0; i < bin_h; ++i) {
      const T* line[U];
#pragma unroll
      for (int u = 0; u < U; ++u) line[u] = rows.at(u, i);
#pragma unroll 1
      for (int j = 0; j < bin_w; ++j) {
#pragma unroll
        for (int u = 0; u < U; ++u) m[u] = NaNMax<T>::max(m[u], NaNMax<T>::load(line[u] + j));
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!exists[u]) continue;
      T value = NaNMax<T>::bits(empty ? V(0) : m[u]);
      if (!empty && !NaNMax<T>::exact(m[u])) {
        value = window_first<T>(rows, u, bin_h, bin_w, Elem<T>::key_of(value));
      }
      store_result<T>(out + u * out_step, value);
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
    int row = 0;
#pragma unroll 1
    for (int i = 0; i < bin_h; ++i) {
      const T* line[U];
#pragma unroll
      for (int u = 0; u < U; ++u) line[u] = rows.at(u, i);
#pragma unroll 1
      for (int j = 0; j < bin_w; ++j) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const V v = Work<T>::in(line[u][j]);
          if (replaces(v, best[u])) {
            best[u] = v;
            at[u] = row + j;
          }
        }
      }
      row += w_int;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!exists[u]) continue;
      T value = Work<T>::out(empty ? V(0) : best[u]);
      if (!Work<T>::kKeepsNaN && !(best[u] == best[u])) {  // the NaN's payload was lost
        value = window_first<T>(rows, u, bin_h, bin_w, Elem<T>::key_of(value));
      }
      store_result<T>(out + u * out_step, value);
      if (kArgmax) store_result<int>(arg + u * out_step, empty ? -1 : first_index + at[u]);
    }
  }
}

// Reduces every bin of tile t that this thread owns (layout), from the buffer or from global
// memory, and stores the results of ROI k.
template <class T, bool kArgmax>
__device__ __forceinline__ void window_reduce(const WindowPlan<T>& plan, const WindowTile& t,
                                              const unsigned char* buffer,
                                              const PlaneLayout& layout, i64 C, i64 k,
                                              T* __restrict__ output, int* __restrict__ argmax) {
  constexpr int U = kWindowChannels;
  typedef WindowPlan<T> P;
  const int groups = static_cast<int>(layout.groups);
  const i64 out_step = static_cast<i64>(groups) * layout.bins;
  for (unsigned int q = layout.first_bin; q < layout.bins; q += layout.bin_step()) {
    const int ph = static_cast<int>(q / static_cast<unsigned int>(plan.PW));
    if (ph < t.ph0 || ph >= t.ph1) continue;
    const int pw = static_cast<int>(q) - ph * plan.PW;
    const int2 rows = plan.edges[ph];
    const int2 cols = plan.edges[plan.PH + pw];
    const int bin_h = rows.y - rows.x, bin_w = cols.y - cols.x;
    const int first_index = rows.x * plan.W + cols.x;
    for (int c = static_cast<int>(layout.first_channel); c < t.channels; c += U * groups) {
      bool exists[U];
      int channel[U];  // in the tile
#pragma unroll
      for (int u = 0; u < U; ++u) {
        exists[u] = c + u * groups < t.channels;
        channel[u] = exists[u] ? c + u * groups : c;
      }
      const i64 at = (k * C + t.channel + c) * layout.bins + q;
      T* out = output + at;
      int* arg = kArgmax ? argmax + at : nullptr;
      if (t.staged) {
        StagedRows<T> staged;
        staged.buffer = reinterpret_cast<const T*>(buffer);
        staged.pitch = static_cast<unsigned int>(plan.words * P::kPerWord);
        staged.flip = static_cast<unsigned int>(plan.sH & 1);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int row = channel[u] * t.rows + rows.x - t.row0;
          staged.row[u] = static_cast<unsigned int>(row) * staged.pitch + (cols.x - plan.col0);
          const unsigned long long start = reinterpret_cast<unsigned long long>(
              plan.row_start(t.channel + channel[u], rows.x));
          staged.odd[u] = P::kPerWord == 2 ? static_cast<unsigned int>(start >> 1) & 1u : 0u;
        }
        window_bin<T, kArgmax>(staged, exists, bin_h, bin_w, plan.W, first_index, out, arg,
                               out_step);
      } else {
        GlobalRows<T> global;
        global.stride = plan.sH;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          global.row[u] = plan.row_start(t.channel + channel[u], rows.x) + (cols.x - plan.col0);
        }
        window_bin<T, kArgmax>(global, exists, bin_h, bin_w, plan.W, first_index, out, arg,
                               out_step);
      }
    }
  }
}

// The window kernel's work in block (k, channel blocks) of ROI k on one map. num_images: N, or 0
// for a ROI that pools nothing. Every thread runs to the end (barriers).
template <class T, class R, bool kArgmax>
__device__ __forceinline__ void window_roi(const T* __restrict__ input, const i64 num_images,
                                           const i64 N, const i64 C, const i64 H, const i64 W,
                                           const i64 sN, const i64 sC, const i64 sH,
                                           const R* __restrict__ row, const i64 rs1,
                                           const double spatial_scale, const i64 PH, const i64 PW,
                                           const i64 channels_per_block, const i64 buffer_words,
                                           T* __restrict__ output, int* __restrict__ argmax,
                                           const i64 k) {
  typedef typename Rois<R>::G G;
  const RoiGeometry<G> g = roi_geometry<R>(row, rs1, num_images, spatial_scale, PH, PW);
  const bool valid = g.batch >= 0;
  int2* edges = reinterpret_cast<int2*>(roi_dynamic_shared);
  const int edge_count = static_cast<int>(PH + PW);
  for (int i = threadIdx.x; i < edge_count; i += blockDim.x) {
    edges[i] = i < PH ? bin_span<G>(i, g.bin_h, g.y1, H, valid)
                      : bin_span<G>(i - PH, g.bin_w, g.x1, W, valid);
  }
  __syncthreads();
  // The plan lives in shared memory (written by thread 0): read where used, it takes no
  // registers through the loops.
  typedef WindowPlan<T> P;
  unsigned char* const after_edges = roi_dynamic_shared + (8 * edge_count + 15) / 16 * 16;
  unsigned char* const buffers = after_edges + kWindowPlanBytes;
  if (threadIdx.x == 0) {
    WindowPlan<T>& plan = *reinterpret_cast<WindowPlan<T>*>(after_edges);
    plan.image = input + (valid ? g.batch : 0) * sN;
    const T* last = input + (N - 1) * sN + (C - 1) * sC + (H - 1) * sH + (W - 1);
    plan.end = reinterpret_cast<const unsigned char*>(last + 1);
    plan.sC = sC;
    plan.sH = sH;
    plan.edges = edges;
    plan.PH = static_cast<int>(PH);
    plan.PW = static_cast<int>(PW);
    plan.W = static_cast<int>(W);  // H * W < 2^31 (checked by roi_ops)
    plan.row0 = edges[0].x;
    plan.rows = edges[PH - 1].y - plan.row0;
    plan.col0 = edges[PH].x;
    const int cols = edges[PH + PW - 1].y - plan.col0;
    plan.words = P::kPerWord == 1 || cols == 0 ? cols : (cols + 2) / 2;  // 16-bit: an odd start
    plan.buffer_words = static_cast<int>(buffer_words * 4 / P::kWordBytes);
    const int window = plan.rows * plan.words;
    plan.per_tile = window <= plan.buffer_words ? (window > 0 ? plan.buffer_words / window : 1 << 30)
                                                : 0;
  }
  __syncthreads();
  const WindowPlan<T>& plan = *reinterpret_cast<const WindowPlan<T>*>(after_edges);
  const PlaneLayout layout(PH, PW, threadIdx.x, blockDim.x);
  for (i64 c0 = blockIdx.y * channels_per_block; c0 < C; c0 += gridDim.y * channels_per_block) {
    const int channel_end =
        static_cast<int>(C - c0 < channels_per_block ? C : c0 + channels_per_block);
    WindowTile tile = plan.first(static_cast<int>(c0), channel_end);
    int b = 0;  // the buffer of this tile
    const i64 buffer_bytes = buffer_words * 4;
    window_stage<T>(plan, tile, buffers);
    copy_async_commit();
    while (tile.channels > 0) {
      // The next tile is worked out again after this one's reduction: nothing of it stays live
      // through the reduction.
      window_stage<T>(plan, plan.next(tile, channel_end), buffers + (b ^ 1) * buffer_bytes);
      copy_async_commit();
      copy_async_wait<1>();  // this tile's copies (the next tile's may still run)
      __syncthreads();
      if (layout.active) {
        window_reduce<T, kArgmax>(plan, tile, buffers + b * buffer_bytes, layout, C, k, output,
                                  argmax);
      }
      __syncthreads();  // the next tile but one reuses this buffer
      tile = plan.next(tile, channel_end);
      b ^= 1;
    }
    copy_async_wait<0>();
  }
}
}  // namespace roi_ops_cuda

// Arguments as the unit kernel's, then buffer_words. Grid (K, channel blocks).
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kWindowBlocksPerSM)
    roi_pool_forward_window(ROI_OPS_MAP_PARAMETERS, const i64 channels_per_block,
                            const i64 buffer_words, ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  (void)sW;  // 1: the launch plan picks this kernel only for a unit W stride
  const i64 k = blockIdx.x;
  window_roi<T, R, kArgmax>(input, N, N, C, H, W, sN, sC, sH, rois + k * rs0, rs1, spatial_scale,
                            PH, PW, channels_per_block, buffer_words, output, argmax, k);
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}

// ---- roi_pool_forward_window_levels<T, R, kArgmax>: the window kernel over pyramid levels ----
// Block (k, channel blocks) pools ROI k from the map of its level; a ROI with no level pools
// nothing. Every level has a unit W stride.
template <class T, class R, bool kArgmax>
__global__ void __launch_bounds__(roi_ops_cuda::kThreads, roi_ops_cuda::kWindowBlocksPerSM)
    roi_pool_forward_window_levels(ROI_OPS_LEVELS_PARAMETERS, const i64 channels_per_block,
                                   const i64 buffer_words, ROI_OPS_FORWARD_OUTPUTS) {
  using namespace roi_ops_cuda;
  const i64 k = blockIdx.x;
  const int level = roi_level(levels, ls0, k, L);
  const LevelMap<T>& map = maps.level[level < 0 ? 0 : level];
  window_roi<T, R, kArgmax>(map.input, level < 0 ? 0 : N, N, C, map.H, map.W, map.sN, map.sC,
                            map.sH, rois + k * rs0, rs1, map.spatial_scale, PH, PW,
                            channels_per_block, buffer_words, output, argmax, k);
  report_bad_roi<R>(rois, rs0, rs1, N, bad_roi_log);
}
