// ---- roi_ops_group_rois<R>: each (level, image)'s ROIs, for the planes backward ---------------
// The planes backward over levels gives a block one image of one level (the grouped single-level
// planes kernel, one image); this kernel lists each such group's ROIs once, so that a block
// reads its group's ROIs instead of scanning all K. ROI k with level l (levels.cuh: roi_level;
// with levels null every ROI has level 0 and L is 1) belongs to group g = l * N + roi_image(k);
// a ROI with no level belongs to none. One block of kGroupThreads threads writes, in groups
// (K + G + 1 int32, G = L * N):
//   groups[0, grouped): ROI indices, group by group in group order, any order within a group;
//   groups[K + g]: the first position of group g, for g in [0, G]; groups[K + G] = grouped.
// The counts are kept at counts[1 + g] while counting, turned into each group's first position
// there by an exclusive scan, and advanced by one per ROI placed: each then ends as the first
// position of group g + 1, and counts[0] stays 0. counts is groups[K, K + G] itself, or, where
// the launch gives (G + 1) * 4 bytes of dynamic shared memory (counts_in_shared), a shared
// array copied there at the end: the many ROIs of few groups then meet in shared-memory atomics
// instead of contended global ones. Requires K + G + 1 < 2^31 (launch plan).
namespace roi_ops_cuda {
constexpr int kGroupThreads = 1024;  // kernels.GROUP_THREADS
constexpr int kGroupUnroll = 4;      // ROIs a thread reads before it counts or places them

// The group of ROI k, or -1.
template <class R>
__device__ __forceinline__ int group_of(const R* __restrict__ rois, i64 rs0,
                                        const i64* __restrict__ levels, i64 ls0, i64 L, i64 N,
                                        i64 k) {
  const int level = levels == nullptr ? 0 : roi_level(levels, ls0, k, L);
  return level < 0 ? -1 : level * static_cast<int>(N) + roi_image<R>(rois, rs0, k, N);
}

// The groups of ROIs k0, k0 + kGroupThreads, ... (kGroupUnroll of them; -1 from K on), read
// before any is used (loads in flight).
template <class R>
__device__ __forceinline__ void groups_of(const R* __restrict__ rois, i64 rs0,
                                          const i64* __restrict__ levels, i64 ls0, i64 L, i64 N,
                                          i64 K, i64 k0, int (&g)[kGroupUnroll]) {
#pragma unroll
  for (int u = 0; u < kGroupUnroll; ++u) {
    const i64 k = k0 + u * kGroupThreads;
    g[u] = k < K ? group_of<R>(rois, rs0, levels, ls0, L, N, k) : -1;
  }
}

// The kernel's work with the counts at `counts` (groups + K, or shared memory; see above).
template <class R>
__device__ __forceinline__ void group_rois(const R* __restrict__ rois, const i64 rs0,
                                           const i64* __restrict__ levels, const i64 ls0,
                                           const i64 L, const i64 N, const i64 K,
                                           int* __restrict__ groups, int* __restrict__ counts) {
  __shared__ int chunk_sums[kGroupThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int G = static_cast<int>(L * N);
  for (int g = tid; g <= G; g += kGroupThreads) counts[g] = 0;
  __syncthreads();
  constexpr i64 kStep = static_cast<i64>(kGroupThreads) * kGroupUnroll;
  for (i64 k0 = tid; k0 < K; k0 += kStep) {
    int g[kGroupUnroll];
    groups_of<R>(rois, rs0, levels, ls0, L, N, K, k0, g);
#pragma unroll
    for (int u = 0; u < kGroupUnroll; ++u) {
      if (g[u] >= 0) atomicAdd(counts + g[u] + 1, 1);
    }
  }
  __syncthreads();
  // Exclusive scan of the counts at counts[1, G]: each thread sums a run of them, the runs'
  // sums are scanned by one thread, and each thread then writes its run's prefixes.
  const int run = (G + kGroupThreads - 1) / kGroupThreads;
  const int begin = 1 + tid * run;
  const int end = begin + run < G + 1 ? begin + run : G + 1;
  int sum = 0;
  for (int g = begin; g < end; ++g) sum += counts[g];
  chunk_sums[tid] = sum;
  __syncthreads();
  if (tid == 0) {
    int total = 0;
    for (int t = 0; t < kGroupThreads; ++t) {
      const int s = chunk_sums[t];
      chunk_sums[t] = total;
      total += s;
    }
  }
  __syncthreads();
  int prefix = chunk_sums[tid];
  for (int g = begin; g < end; ++g) {
    const int count = counts[g];
    counts[g] = prefix;
    prefix += count;
  }
  __syncthreads();
  for (i64 k0 = tid; k0 < K; k0 += kStep) {
    int g[kGroupUnroll];
    groups_of<R>(rois, rs0, levels, ls0, L, N, K, k0, g);
#pragma unroll
    for (int u = 0; u < kGroupUnroll; ++u) {
      const int k = static_cast<int>(k0 + u * kGroupThreads);  // K < 2^31
      if (g[u] >= 0) groups[atomicAdd(counts + g[u] + 1, 1)] = k;
    }
  }
}
}  // namespace roi_ops_cuda

template <class R>
__global__ void __launch_bounds__(roi_ops_cuda::kGroupThreads)
    roi_ops_group_rois(const R* __restrict__ rois, const i64 rs0, const i64* __restrict__ levels,
                       const i64 ls0, const i64 L, const i64 N, const i64 K,
                       int* __restrict__ groups, const i64 counts_in_shared) {
  using namespace roi_ops_cuda;
  int* const first = groups + K;
  if (counts_in_shared) {
    int* const counts = reinterpret_cast<int*>(roi_dynamic_shared);
    group_rois<R>(rois, rs0, levels, ls0, L, N, K, groups, counts);
    __syncthreads();
    for (i64 g = threadIdx.x; g <= L * N; g += kGroupThreads) first[g] = counts[g];
  } else {
    group_rois<R>(rois, rs0, levels, ls0, L, N, K, groups, first);
  }
}
