// ---- Tables of maxima for the cvec kernels' inference ------------------------------------------
// A bin of at least 2 x 2 elements is pooled from a table of every position's 2 x 2 maximum, one
// of at least 4 x 4 from a table of 4 x 4 maxima, reading a quarter (a sixteenth) of the elements
// (cvec_bin; the squares overlap the last ones where a side is not a multiple). Both tables have
// the map's shape and layout (dense channels_last, N images each): the 2 x 2 table `tables`, the
// 4 x 4 table N * H * W * C elements further. A table's max.NaN, as the scan's, may lose a zero's
// sign and a NaN's payload, so the cvec kernel reads such results again from the map: the outputs
// stay exact.
//
// The tables pay when the reads they save outweigh their build (a pass over the map), which the
// ROIs' bin sizes decide and the host does not know without a sync: roi_ops_table_savings counts
// on the device the element reads that the tables would save, and the build compares the count
// with its cost, builds or not, and writes the decision that the cvec kernel reads
// (planning.uses_max_tables). The decision's bytes (planning.TABLE_HEAD_BYTES): the decision's
// int32, then from byte 16 one long long count for each block of roi_ops_table_savings.
namespace roi_ops_cuda {
constexpr int kTableSavingsThreads = 256;  // kernels.TABLE_SAVINGS_THREADS
constexpr int kTableSavingsBlocks = 64;    // kernels.TABLE_SAVINGS_BLOCKS: the count's blocks
constexpr int kTableThreads = 256;         // kernels.TABLE_THREADS
constexpr int kTableRows = 16;             // kernels.TABLE_ROWS: rows of one table thread
constexpr int kTableBlocksPerSM = 3;       // planning.TABLE_BLOCKS_PER_SM

// One axis of a ROI's bins: for each class of span (the side a span alone allows: 1, 2 or 4,
// index 0, 1, 2) and each side s up to it, the sum of ceil(span / s) over the class's spans.
struct AxisReads {
  long long sum[3][3];  // [class][side index]
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int c = 0; c < 3; ++c) {
#pragma unroll
      for (int s = 0; s < 3; ++s) sum[c][s] = 0;
    }
  }
  __device__ __forceinline__ void add(int span) {
    const int of = span >= 4 ? 2 : span >= 2 ? 1 : 0;
#pragma unroll
    for (int c = 0; c < 3; ++c) {  // constant indices only: the sums stay in registers
      if (c == of) {
        sum[c][0] += span;
        sum[c][1] += (span + 1) / 2;
        sum[c][2] += (span + 3) / 4;
      }
    }
  }
};

// The element reads a ROI's bins save when read through the tables: the bins' elements less the
// table entries they read (each bin at table_side of its two spans, the smaller class of the
// two).
template <class G>
__device__ __forceinline__ long long roi_saved_reads(const RoiGeometry<G>& g, i64 H, i64 W,
                                                     i64 PH, i64 PW) {
  if (g.batch < 0) return 0;
  AxisReads rows, cols;
  rows.clear();
  cols.clear();
  for (i64 p = 0; p < PH; ++p) {
    const int2 span = bin_span<G>(p, g.bin_h, g.y1, H, true);
    rows.add(span.y > span.x ? span.y - span.x : 0);
  }
  for (i64 p = 0; p < PW; ++p) {
    const int2 span = bin_span<G>(p, g.bin_w, g.x1, W, true);
    cols.add(span.y > span.x ? span.y - span.x : 0);
  }
  long long all_rows = 0, all_cols = 0, table = 0;
#pragma unroll
  for (int r = 0; r < 3; ++r) {
    all_rows += rows.sum[r][0];
    all_cols += cols.sum[r][0];
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      const int s = r < c ? r : c;
      table += rows.sum[r][s] * cols.sum[c][s];
    }
  }
  return all_rows * all_cols - table;
}
}  // namespace roi_ops_cuda

// ---- roi_ops_table_savings<R>: the element reads the tables would save -----------------------
// Blocks of kTableSavingsThreads threads (at most kTableSavingsBlocks), striding over the K ROIs:
// block b writes its count (the decision's bytes, above), the element reads that the tables save
// over its ROIs' bins (exact bins of the contract's geometry, one channel). Integers: the sum is
// exact in any order.
template <class R>
__global__ void __launch_bounds__(roi_ops_cuda::kTableSavingsThreads, 1)
    roi_ops_table_savings(const R* __restrict__ rois, const i64 rs0, const i64 rs1, const i64 K,
                          const i64 N, const i64 H, const i64 W, const double spatial_scale,
                          const i64 PH, const i64 PW, int* __restrict__ decision) {
  using namespace roi_ops_cuda;
  __shared__ long long partial[kTableSavingsThreads];
  const int tid = static_cast<int>(threadIdx.x);
  long long saved = 0;
  const i64 stride = static_cast<i64>(gridDim.x) * kTableSavingsThreads;
  for (i64 k = static_cast<i64>(blockIdx.x) * kTableSavingsThreads + tid; k < K; k += stride) {
    const auto g = roi_geometry<R>(rois + k * rs0, rs1, N, spatial_scale, PH, PW);
    saved += roi_saved_reads(g, H, W, PH, PW);
  }
  partial[tid] = saved;
  __syncthreads();
  for (int half = kTableSavingsThreads / 2; half > 0; half /= 2) {
    if (tid < half) partial[tid] += partial[tid + half];
    __syncthreads();
  }
  if (tid == 0) reinterpret_cast<long long*>(decision + 4)[blockIdx.x] = partial[0];
}

namespace roi_ops_cuda {
#ifdef ROI_OPS_MAX_NAN
// Work item t of roi_ops_max_tables (below): one 16-byte channel vector (cv of C / V) at column
// w of image n for kTableRows rows from h0 (t: cv fastest, then w, then the row chunk, then n).
// For each row it reads the vectors at columns w .. w + 3 (clamped to the map: entries whose
// square leaves the map are never read), keeps the pairs' and quads' maxima of the last rows,
// and writes the 2 x 2 and 4 x 4 entries of its rows.
template <class T>
__device__ __forceinline__ void max_tables_item(const T* __restrict__ input, i64 N, i64 C, i64 H,
                                                i64 W, i64 vectors, i64 chunks, i64 t,
                                                T* __restrict__ tables) {
  typedef PackedMax<T> M;
  constexpr int V = 16 / sizeof(T);  // channels a vector
  const i64 cv = t % vectors;
  i64 rest = t / vectors;
  const int w = static_cast<int>(rest % W);
  rest /= W;
  const int h0 = static_cast<int>(rest % chunks) * kTableRows;
  const i64 n = rest / chunks;
  const int h_end = static_cast<int>(H - h0 < kTableRows ? H : h0 + kTableRows);
  const i64 row_elements = W * C;
  const i64 first = n * H * row_elements + w * C + cv * V;  // (n, 0, w, cv's first channel)
  const T* __restrict__ image = input + first;
  T* __restrict__ table2 = tables + first;
  T* __restrict__ table4 = table2 + N * H * row_elements;
  int column[4];  // columns w .. w + 3 within the map, in elements from column w
#pragma unroll
  for (int d = 0; d < 4; ++d) {
    const int x = w + d < W ? w + d : static_cast<int>(W) - 1;
    column[d] = (x - w) * static_cast<int>(C);
  }
  unsigned int pair_above[4] = {};  // the row above's maxima over columns w, w + 1
  unsigned int quads[3][4] = {};    // the three rows above's over columns w .. w + 3, nearest first
  for (int h = h0; h < h_end + 3; ++h) {
    const i64 offset = static_cast<i64>(h < H ? h : H - 1) * row_elements;
    roi_vec16 v[4];
#pragma unroll
    for (int d = 0; d < 4; ++d) v[d] = load_vec16(image + offset + column[d]);
    unsigned int pair[4], quad[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      pair[k] = M::max(v[0].w[k], v[1].w[k]);
      quad[k] = M::max(pair[k], M::max(v[2].w[k], v[3].w[k]));
    }
    const int above = h - 1;  // the 2 x 2 entry of row h - 1: rows h - 1 and h
    if (above >= h0 && above < h_end) {
      roi_vec16 entry;
#pragma unroll
      for (int k = 0; k < 4; ++k) entry.w[k] = M::max(pair_above[k], pair[k]);
      *reinterpret_cast<roi_vec16*>(table2 + above * row_elements) = entry;
    }
    const int top = h - 3;  // the 4 x 4 entry of row h - 3: rows h - 3 .. h
    if (top >= h0 && top < h_end) {
      roi_vec16 entry;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        entry.w[k] = M::max(M::max(quads[2][k], quads[1][k]), M::max(quads[0][k], quad[k]));
      }
      *reinterpret_cast<roi_vec16*>(table4 + top * row_elements) = entry;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      pair_above[k] = pair[k];
      quads[2][k] = quads[1][k];
      quads[1][k] = quads[0][k];
      quads[0][k] = quad[k];
    }
  }
}
#endif
}  // namespace roi_ops_cuda

// ---- roi_ops_max_tables<T>: the 2 x 2 and 4 x 4 tables of a dense channels_last map ----------
// Every block sums the `counts` blocks' counts of roi_ops_table_savings (the same integers: every
// block decides alike) and builds only when they reach min_saved_per_position * N * H * W (the
// build's cost in the same unit); block 0 writes the decision (1 or 0) for the cvec kernel. Its
// grid is a few blocks an SM (planning.plan_max_tables), so that a call without tables pays
// little for it, its threads striding over the work items (max_tables_item). Every max is
// max.NaN (PackedMax: the cvec kernel's inference). Only where max.NaN exists (sm_80+); float32,
// float16 and bfloat16.
template <class T>
__global__ void __launch_bounds__(roi_ops_cuda::kTableThreads, roi_ops_cuda::kTableBlocksPerSM)
    roi_ops_max_tables(const T* __restrict__ input, const i64 N, const i64 C, const i64 H,
                       const i64 W, const i64 counts, const double min_saved_per_position,
                       int* __restrict__ decision, T* __restrict__ tables) {
  using namespace roi_ops_cuda;
#ifdef ROI_OPS_MAX_NAN
  __shared__ long long partial[kTableSavingsBlocks];
  __shared__ int yes;
  const int tid = static_cast<int>(threadIdx.x);
  const long long* __restrict__ saved = reinterpret_cast<const long long*>(decision + 4);
  if (tid < kTableSavingsBlocks) partial[tid] = tid < counts ? saved[tid] : 0;
  __syncthreads();
  for (int half = kTableSavingsBlocks / 2; half > 0; half /= 2) {
    if (tid < half) partial[tid] += partial[tid + half];
    __syncthreads();
  }
  if (tid == 0) {
    const double positions = static_cast<double>(N) * static_cast<double>(H * W);
    yes = static_cast<double>(partial[0]) >= min_saved_per_position * positions ? 1 : 0;
    if (blockIdx.x == 0) decision[0] = yes;
  }
  __syncthreads();
  if (yes == 0) return;
  const i64 vectors = C / (16 / static_cast<i64>(sizeof(T)));  // 16-byte channel vectors
  const i64 chunks = (H + kTableRows - 1) / kTableRows;
  const i64 items = N * chunks * W * vectors;
  for (i64 t = static_cast<i64>(blockIdx.x) * kTableThreads + threadIdx.x; t < items;
       t += static_cast<i64>(gridDim.x) * kTableThreads) {
    max_tables_item<T>(input, N, C, H, W, vectors, chunks, t, tables);
  }
#else
  (void)input, (void)N, (void)C, (void)H, (void)W, (void)counts, (void)min_saved_per_position;
  (void)decision, (void)tables;
#endif
}
