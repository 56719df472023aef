// What the fused multi-level kernels (the *_levels kernels of every family) share: the table of
// the pyramid levels' maps (and of their gradients) and each ROI's level.
//
// A multi-level call passes its levels' maps by value, as one kernel parameter (no copy to the
// device, no synchronisation), and a (K,) int64 tensor of each ROI's level. A ROI takes the map
// of its level; a ROI with no level (-1, or anything outside [0, L)) pools nothing (zeros,
// argmax -1), as an invalid ROI does, and is recorded in the bad-ROI log only when its row is
// invalid by the contract. The kernels index the table with the ROI's level: the compiler reads
// the parameter with an indexed constant load (no copy to local memory).
namespace roi_ops_cuda {
constexpr int kMaxLevels = 8;  // kernels.MAX_LEVELS

// One level's feature map: its first element, sizes and strides (in elements), spatial scale.
template <class T>
struct LevelMap {
  const T* input;
  i64 H, W, sN, sC, sH, sW;
  double spatial_scale;
};
template <class T>
struct LevelMaps {
  LevelMap<T> level[kMaxLevels];
};

// One level's gradient (the atomic backward's): its first element and strides (in elements).
template <class A>
struct LevelGrad {
  A* grad_input;
  i64 gi_image, gi_channel, gi_pixel;
};
template <class A>
struct LevelGrads {
  LevelGrad<A> level[kMaxLevels];
};

// One level's gradient for the planes backward over levels (written whole, in the gradient's
// dtype): its first element and strides (in elements), H * W, channels per block, and the grid
// index of its first block (each level's blocks are a run; the launch plan orders the runs).
template <class T>
struct LevelPlane {
  T* grad_input;
  i64 gi_image, gi_channel, gi_pixel, HW, channels_per_block, first_block;
};
template <class T>
struct LevelPlanes {
  LevelPlane<T> level[kMaxLevels];
};

// The level of ROI k: levels[k * ls0] when it is in [0, L), else -1.
__device__ __forceinline__ int roi_level(const i64* __restrict__ levels, i64 ls0, i64 k, i64 L) {
  const i64 level = levels[k * ls0];
  return level >= 0 && level < L ? static_cast<int>(level) : -1;
}
}  // namespace roi_ops_cuda
