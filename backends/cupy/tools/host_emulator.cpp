// CPU emulator of roi_pool.cu's kernels, for testing on machines without a GPU.
//
// Includes the real kernel source with the CUDA keywords mapped to host C++: one std::thread per
// thread of a block runs every block in turn, with a std::barrier for __syncthreads; __shared__
// arrays become statics (blocks run one at a time), the _rn intrinsics plain IEEE operations
// (build with -ffp-contract=off), and float16 conversions are done in software with
// round-to-nearest-even. __ballot_sync is emulated for code that every thread of the block
// reaches together (it synchronises the whole block), which is how roi_pool.cu uses it.
// What it cannot check: warp scheduling, real memory coalescing, NVRTC itself, CuPy launches.
//
// Build (tests/test_backend_cupy.py does this), with roi_ops_cupy/ as include directory:
//   g++ -std=c++20 -O1 -ffp-contract=off -fPIC -shared -pthread -Iroi_ops_cupy
//       tools/host_emulator.cpp -o host_emulator.so
// API: roi_emulate(name_expression, grid_x, grid_y, block_x, block_y, args, shared_mem) runs one
// launch whose arguments are all 8 bytes (pointers, int64, double bit patterns), as kernels.Launch.

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define ROI_OPS_HOST_EMULATION 1

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
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline long long __double_as_longlong(double d) {
  long long i;
  std::memcpy(&i, &d, sizeof i);
  return i;
}
inline double __longlong_as_double(long long i) {
  double d;
  std::memcpy(&d, &i, sizeof d);
  return d;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

std::mutex atomic_mutex;
template <class A>
inline A atomicAdd(A* address, A value) {
  std::lock_guard<std::mutex> lock(atomic_mutex);
  const A old = *address;
  *address = old + value;
  return old;
}

namespace roi_ops_cuda {
constexpr int kMaxEdges = 4096;
int2 roi_edges[kMaxEdges];
alignas(16) unsigned char planes_shared[256 * 1024];  // the planes backward's dynamic memory

inline float half_to_float(unsigned short h) {
  const unsigned int sign = (h & 0x8000u) << 16;
  const unsigned int exponent = (h >> 10) & 0x1f;
  const unsigned int mantissa = h & 0x3ff;
  float magnitude;
  if (exponent == 0x1f) {
    const unsigned int bits = 0x7f800000u | (mantissa << 13);
    std::memcpy(&magnitude, &bits, sizeof magnitude);
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
  }
  unsigned int bits;
  std::memcpy(&bits, &magnitude, sizeof bits);
  bits |= sign;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

inline unsigned short float_to_half(float f) {
  unsigned int x;
  std::memcpy(&x, &f, sizeof x);
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
}  // namespace roi_ops_cuda

#include "roi_pool.cu"

namespace {

using Args = const std::uint64_t*;
using Runner = void (*)(Args);

template <class P>
P ptr(std::uint64_t v) {
  return reinterpret_cast<P>(static_cast<std::uintptr_t>(v));
}
i64 num(std::uint64_t v) { return static_cast<i64>(v); }
double real(std::uint64_t v) {
  double d;
  std::memcpy(&d, &v, sizeof d);
  return d;
}

// Every forward kernel has the same parameters.
template <class T, class R>
using ForwardKernel = void (*)(const T*, i64, i64, i64, i64, i64, i64, i64, i64, const R*, i64,
                               i64, double, i64, i64, i64, T*, int*);

template <class T, class R, ForwardKernel<T, R> kKernel>
void run_forward(Args a) {
  kKernel(ptr<const T*>(a[0]), num(a[1]), num(a[2]), num(a[3]), num(a[4]), num(a[5]), num(a[6]),
          num(a[7]), num(a[8]), ptr<const R*>(a[9]), num(a[10]), num(a[11]), real(a[12]),
          num(a[13]), num(a[14]), num(a[15]), ptr<T*>(a[16]), ptr<int*>(a[17]));
}

template <class T>
void run_backward(Args a) {
  roi_pool_backward_atomic<T>(ptr<const T*>(a[0]), num(a[1]), num(a[2]), num(a[3]), num(a[4]),
                              ptr<const int*>(a[5]), ptr<const i64*>(a[6]), num(a[7]),
                              num(a[8]), num(a[9]), num(a[10]), num(a[11]), num(a[12]),
                              ptr<typename roi_ops_cuda::Accum<T>::type*>(a[13]), num(a[14]),
                              num(a[15]), num(a[16]));
}

template <class T, int kBlock>
void run_backward_planes(Args a) {
  roi_pool_backward_planes<T, kBlock>(ptr<const T*>(a[0]), num(a[1]), num(a[2]), num(a[3]),
                                      num(a[4]), ptr<const int*>(a[5]), ptr<const i64*>(a[6]),
                                      num(a[7]), num(a[8]), num(a[9]), num(a[10]), num(a[11]),
                                      num(a[12]), ptr<T*>(a[13]), num(a[14]), num(a[15]),
                                      num(a[16]), num(a[17]));
}

struct Entry {
  const char* name;
  Runner run;
};

#define ROI_FORWARD_KERNEL(K, T, R)                                                  \
  {#K "<" #T ", " #R ", true>", &run_forward<T, R, &K<T, R, true>>},                \
      {#K "<" #T ", " #R ", false>", &run_forward<T, R, &K<T, R, false>>},
#define ROI_FORWARD(T, R)                                                           \
  ROI_FORWARD_KERNEL(roi_pool_forward_plane, T, R)                                  \
  ROI_FORWARD_KERNEL(roi_pool_forward_chan, T, R)                                   \
  ROI_FORWARD_KERNEL(roi_pool_forward_unit, T, R)                                   \
  ROI_FORWARD_KERNEL(roi_pool_forward_cvec, T, R)
#define ROI_BACKWARD(T)                                          \
  {"roi_pool_backward_atomic<" #T ">", &run_backward<T>},        \
      {"roi_pool_backward_planes<" #T ", 256>", &run_backward_planes<T, 256>},   \
      {"roi_pool_backward_planes<" #T ", 1024>", &run_backward_planes<T, 1024>},

const Entry kEntries[] = {
    ROI_FORWARD(roi_half, roi_half) ROI_FORWARD(roi_bf16, roi_bf16) ROI_FORWARD(float, float)
        ROI_FORWARD(double, double) ROI_FORWARD(roi_half, float) ROI_FORWARD(roi_bf16, float)
            ROI_BACKWARD(roi_half) ROI_BACKWARD(roi_bf16) ROI_BACKWARD(float)
                ROI_BACKWARD(double)};

}  // namespace

// Returns 0, or -1 for an unknown name, -2 for too much dynamic shared memory, -3 for a block
// of more than 1024 threads.
constexpr unsigned int kMaxThreads = 1024;
extern "C" int roi_emulate(const char* name, unsigned int grid_x, unsigned int grid_y,
                           unsigned int block_x, unsigned int block_y, const std::uint64_t* args,
                           unsigned long long shared_mem) {
  Runner run = nullptr;
  for (const Entry& entry : kEntries) {
    if (std::string(entry.name) == name) run = entry.run;
  }
  if (run == nullptr) return -1;
  const bool planes = std::string(name).rfind("roi_pool_backward_planes", 0) == 0;
  if (shared_mem > (planes ? sizeof(roi_ops_cuda::planes_shared) : sizeof(roi_ops_cuda::roi_edges)))
    return -2;
  const unsigned int count = block_x * block_y;
  if (count == 0 || count > kMaxThreads) return -3;
  ballot_votes.assign(count, 0);
  gridDim = dim3{grid_x, grid_y, 1};
  blockDim = dim3{block_x, block_y, 1};
  // The block's threads walk the blocks in the same order; a barrier after each block keeps the
  // next block from reusing the static "shared" arrays while this one still reads them.
  std::barrier<> barrier(count);
  block_barrier = &barrier;

  std::vector<std::thread> threads;
  threads.reserve(count);
  for (unsigned int t = 0; t < count; ++t) {
    threads.emplace_back([=] {
      threadIdx = dim3{t % block_x, t / block_x, 0};
      for (unsigned int by = 0; by < grid_y; ++by) {
        for (unsigned int bx = 0; bx < grid_x; ++bx) {
          blockIdx = dim3{bx, by, 0};
          run(args);
          __syncthreads();
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  return 0;
}

// The float16 conversions above, exposed so that tests can compare them with torch's.
extern "C" unsigned short roi_float_to_half(float f) { return roi_ops_cuda::float_to_half(f); }
extern "C" float roi_half_to_float(unsigned short h) { return roi_ops_cuda::half_to_float(h); }
