// CPU emulator of the CuPy backend's kernels, for testing on machines without a GPU.
//
// Includes the real kernel source (roi_ops_kernels.cu: kernels.source(), written by
// tools/emulator.py) with the CUDA keywords mapped to host C++: one std::thread per thread of a
// block runs every block in turn, with a std::barrier for __syncthreads; __shared__ arrays become
// statics (blocks run one at a time), the _rn intrinsics plain IEEE operations (build with
// -ffp-contract=off), and the PTX primitives of cuda/common.cuh host functions: float16
// conversions in software with round-to-nearest-even, and max.NaN adversarial (ties return the
// later operand, NaNs a canonical NaN) so that the kernels' fix-ups for zeros and NaNs are tested.
// __ballot_sync is emulated for code that every thread of the block reaches together (it
// synchronises the whole block), which is how the kernels use it. What it cannot check: warp
// scheduling, real memory coalescing, NVRTC itself, CuPy launches.
//
// Build (tools/emulator.py does this), with the folder holding roi_ops_kernels.cu and
// roi_ops_kernel_names.inc (one ROI_KERNEL(name, expression) line per instantiation) on the
// include path:
//   g++ -std=c++20 -O1 -ffp-contract=off -fPIC -shared -pthread -I<folder>
//       tools/host_emulator.cpp -o host_emulator.so
// API: roi_emulate(name, grid_x, grid_y, block_x, block_y, args, count, shared_mem) runs one
// launch of `count` 8-byte words of arguments (pointers, int64, double bit patterns; a struct
// argument takes its size in words), as kernels.Launch.

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define ROI_OPS_HOST_EMULATION 1
#define ROI_OPS_MAX_NAN 1
#define ROI_OPS_GT_MASK_BF16X2 1

struct dim3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct int2 {
  int x, y;
};
inline int2 make_int2(int x, int y) { return int2{x, y}; }

dim3 gridDim, blockDim;
thread_local dim3 blockIdx, threadIdx;
std::barrier<>* block_barrier = nullptr;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }

std::vector<unsigned char> ballot_votes;  // one per thread of the block
inline unsigned int __ballot_sync(unsigned int, bool predicate) {
  const unsigned int count = blockDim.x * blockDim.y;
  const unsigned int t = threadIdx.y * blockDim.x + threadIdx.x;
  ballot_votes[t] = predicate;
  __syncthreads();
  unsigned int bits = 0;
  const unsigned int first = t & ~31u;
  for (unsigned int i = 0; i < 32 && first + i < count; ++i) {
    if (ballot_votes[first + i]) bits |= 1u << i;
  }
  __syncthreads();
  return bits;
}
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __ffs(unsigned int v) { return __builtin_ffs(static_cast<int>(v)); }
template <class P>
inline P __ldcs(const P* address) {
  return *address;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __ll2float_rn(long long v) { return static_cast<float>(v); }
inline double __ll2double_rn(long long v) { return static_cast<double>(v); }
inline float __double2float_rn(double v) { return static_cast<float>(v); }
template <class To, class From>
inline To bit_cast(From from) {
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}
inline int __float_as_int(float f) { return bit_cast<int>(f); }
inline float __int_as_float(int i) { return bit_cast<float>(i); }
inline long long __double_as_longlong(double d) { return bit_cast<long long>(d); }
inline double __longlong_as_double(long long i) { return bit_cast<double>(i); }
inline unsigned int __float_as_uint(float f) { return bit_cast<unsigned int>(f); }
inline float __uint_as_float(unsigned int u) { return bit_cast<float>(u); }

std::mutex atomic_mutex;
template <class A>
inline A atomicAdd(A* address, A value) {
  std::lock_guard<std::mutex> lock(atomic_mutex);
  const A old = *address;
  *address = old + value;
  return old;
}
template <class A>
inline A atomicMin(A* address, A value) {
  std::lock_guard<std::mutex> lock(atomic_mutex);
  const A old = *address;
  *address = value < old ? value : old;
  return old;
}

// The PTX primitives of cuda/common.cuh (its ROI_OPS_HOST_EMULATION block).
namespace roi_ops_cuda {
alignas(16) unsigned char roi_dynamic_shared[256 * 1024];
unsigned long long launch_dynamic_shared = 0;  // the launch's shared_mem
inline unsigned int dynamic_shared_bytes() {
  return static_cast<unsigned int>(launch_dynamic_shared);
}

inline float half_to_float(unsigned short h) {
  const unsigned int sign = (h & 0x8000u) << 16;
  const unsigned int exponent = (h >> 10) & 0x1f;
  const unsigned int mantissa = h & 0x3ff;
  float magnitude;
  if (exponent == 0x1f) {
    magnitude = bit_cast<float>(0x7f800000u | (mantissa << 13));
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
  }
  return bit_cast<float>(bit_cast<unsigned int>(magnitude) | sign);
}

inline unsigned short float_to_half(float f) {
  const unsigned int x = bit_cast<unsigned int>(f);
  const unsigned int sign = (x >> 16) & 0x8000u;
  const unsigned int magnitude = x & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<unsigned short>(sign | 0x7e00u);  // NaN
  if (magnitude >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520
  if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24
    const double units = std::nearbyint(static_cast<double>(std::fabs(f)) * 16777216.0);
    return static_cast<unsigned short>(sign | static_cast<unsigned int>(units));
  }
  unsigned int h = ((((magnitude >> 23) - 127 + 15) << 10) | ((magnitude >> 13) & 0x3ff));
  const unsigned int rest = magnitude & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h += 1;  // a carry moves up the exponent
  return static_cast<unsigned short>(sign | h);
}

inline bool first_thread_of_row_0() {
  return threadIdx.x == 0 && threadIdx.y == 0 && blockIdx.y == 0;
}
inline long long block_column() { return blockIdx.x; }

inline bool replaces(float v, float best) { return !(v <= best) && best == best; }

inline void store_streaming(unsigned short* a, unsigned short v) { *a = v; }
inline void store_streaming(unsigned int* a, unsigned int v) { *a = v; }
inline void store_streaming(unsigned long long* a, unsigned long long v) { *a = v; }

struct alignas(16) roi_vec16 {
  unsigned int w[4];
};
// A 16-byte access needs a 16-byte aligned address on the GPU (else the launch faults): counted
// here, and roi_emulate then fails the launch.
std::atomic<unsigned long long> misaligned_accesses{0};
inline void check_aligned16(const void* address) {
  if (reinterpret_cast<std::uintptr_t>(address) % 16 != 0) ++misaligned_accesses;
}
inline roi_vec16 load_vec16(const void* address) {
  check_aligned16(address);
  roi_vec16 v;
  std::memcpy(&v, address, sizeof v);
  return v;
}
inline void store_streaming(roi_vec16* a, const roi_vec16& v) {
  check_aligned16(a);
  std::memcpy(a, &v, sizeof v);
}

inline float max_nan(float a, float b) {
  return a != a || b != b ? bit_cast<float>(0x7fffffffu) : (b >= a ? b : a);
}
inline unsigned short max_nan_16(unsigned short a, unsigned short b, float x, float y) {
  return x != x || y != y ? static_cast<unsigned short>(0x7fff) : (y >= x ? b : a);
}
inline unsigned short max_nan_f16(unsigned short a, unsigned short b) {
  return max_nan_16(a, b, half_to_float(a), half_to_float(b));
}
inline unsigned short max_nan_bf16(unsigned short a, unsigned short b) {
  return max_nan_16(a, b, bit_cast<float>(static_cast<unsigned int>(a) << 16),
                    bit_cast<float>(static_cast<unsigned int>(b) << 16));
}
template <unsigned short (*kMax)(unsigned short, unsigned short)>
inline unsigned int max_nan_x2(unsigned int a, unsigned int b) {
  const unsigned int low = kMax(a & 0xffffu, b & 0xffffu);
  const unsigned int high = kMax(a >> 16, b >> 16);
  return high << 16 | low;
}
inline unsigned int max_nan_f16x2(unsigned int a, unsigned int b) {
  return max_nan_x2<max_nan_f16>(a, b);
}
inline unsigned int max_nan_bf16x2(unsigned int a, unsigned int b) {
  return max_nan_x2<max_nan_bf16>(a, b);
}
template <float (*kFloat)(unsigned short)>
inline unsigned int gt_mask_x2(unsigned int a, unsigned int b) {
  const unsigned int low = kFloat(a & 0xffffu) > kFloat(b & 0xffffu) ? 0xffffu : 0u;
  const unsigned int high = kFloat(a >> 16) > kFloat(b >> 16) ? 0xffffu : 0u;
  return high << 16 | low;
}
inline float bf16_bits_to_float(unsigned short b) {
  return bit_cast<float>(static_cast<unsigned int>(b) << 16);
}
inline unsigned int gt_mask_f16x2(unsigned int a, unsigned int b) {
  return gt_mask_x2<half_to_float>(a, b);
}
inline unsigned int gt_mask_bf16x2(unsigned int a, unsigned int b) {
  return gt_mask_x2<bf16_bits_to_float>(a, b);
}
}  // namespace roi_ops_cuda

#include "roi_ops_kernels.cu"

namespace {

using Args = const std::uint64_t*;
using Runner = void (*)(Args);

// The 8-byte words of one argument: one for a scalar or pointer, ceil(size / 8) for a struct
// passed by value (the level tables: every member 8 bytes).
template <class P>
constexpr unsigned int words_of() {
  return static_cast<unsigned int>((sizeof(P) + 7) / 8);
}

template <class P>
P from_words(const std::uint64_t* words) {
  const std::uint64_t word = words[0];
  if constexpr (std::is_class_v<P>) {
    P value;
    std::memcpy(&value, words, sizeof value);
    return value;
  } else if constexpr (std::is_pointer_v<P>) {
    return reinterpret_cast<P>(static_cast<std::uintptr_t>(word));
  } else if constexpr (std::is_floating_point_v<P>) {
    return bit_cast<double>(word);
  } else {
    return static_cast<P>(word);
  }
}

// The word offset of each argument.
template <class... P>
constexpr std::array<unsigned int, sizeof...(P)> offsets() {
  std::array<unsigned int, sizeof...(P)> at{};
  const unsigned int sizes[] = {words_of<P>()..., 0};
  unsigned int next = 0;
  for (std::size_t i = 0; i < sizeof...(P); ++i) {
    at[i] = next;
    next += sizes[i];
  }
  return at;
}

// Calls a kernel (a plain function here) with its arguments unpacked from 8-byte words.
template <class... P, std::size_t... I>
void call(void (*kernel)(P...), Args args, std::index_sequence<I...>) {
  constexpr std::array<unsigned int, sizeof...(P)> at = offsets<P...>();
  kernel(from_words<P>(args + at[I])...);
}
template <class... P>
void call(void (*kernel)(P...), Args args) {
  call(kernel, args, std::index_sequence_for<P...>{});
}
template <auto kKernel>
void run(Args args) {
  call(kKernel, args);
}
// The kernel's arguments in words.
template <class... P>
constexpr unsigned int arity(void (*)(P...)) {
  return (0u + ... + words_of<P>());
}

struct Entry {
  const char* name;
  Runner run;
  unsigned int arity;
};

#define ROI_KERNEL(NAME, ...) {NAME, &run<&__VA_ARGS__>, arity(&__VA_ARGS__)},
const Entry kEntries[] = {
#include "roi_ops_kernel_names.inc"
};
#undef ROI_KERNEL

}  // namespace

// Returns 0, or -1 for an unknown name, -2 for too much dynamic shared memory, -3 for a block
// of more than 1024 threads, -4 for the wrong number of arguments, -5 when the kernel made a
// misaligned 16-byte access (the launch ran to its end).
constexpr unsigned int kMaxThreads = 1024;
extern "C" int roi_emulate(const char* name, unsigned int grid_x, unsigned int grid_y,
                           unsigned int block_x, unsigned int block_y, const std::uint64_t* args,
                           unsigned int count, unsigned long long shared_mem) {
  const Entry* entry = nullptr;
  for (const Entry& candidate : kEntries) {
    if (std::string(candidate.name) == name) entry = &candidate;
  }
  if (entry == nullptr) return -1;
  if (shared_mem > sizeof(roi_ops_cuda::roi_dynamic_shared)) return -2;
  roi_ops_cuda::launch_dynamic_shared = shared_mem;
  const unsigned int threads = block_x * block_y;
  if (threads == 0 || threads > kMaxThreads) return -3;
  if (count != entry->arity) return -4;
  ballot_votes.assign(threads, 0);
  roi_ops_cuda::misaligned_accesses = 0;
  gridDim = dim3{grid_x, grid_y, 1};
  blockDim = dim3{block_x, block_y, 1};
  // The block's threads walk the blocks in the same order; a barrier after each block keeps the
  // next block from reusing the static "shared" arrays while this one still reads them.
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  const Runner run_kernel = entry->run;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned int t = 0; t < threads; ++t) {
    pool.emplace_back([=] {
      threadIdx = dim3{t % block_x, t / block_x, 0};
      for (unsigned int by = 0; by < grid_y; ++by) {
        for (unsigned int bx = 0; bx < grid_x; ++bx) {
          blockIdx = dim3{bx, by, 0};
          run_kernel(args);
          __syncthreads();
        }
      }
    });
  }
  for (std::thread& thread : pool) thread.join();
  return roi_ops_cuda::misaligned_accesses == 0 ? 0 : -5;
}

// The float16 conversions above, exposed so that tests can compare them with torch's.
extern "C" unsigned short roi_float_to_half(float f) { return roi_ops_cuda::float_to_half(f); }
extern "C" float roi_half_to_float(unsigned short h) { return roi_ops_cuda::half_to_float(h); }
