// The CPU kernels' loops, shared by cpu_kernels.cpp and variant_cpu.cpp: at::parallel_for over
// the fixed-size work items of plan.h (CpuItems), explicit 4-wide fp32 vectors, and
// deterministic reductions (kLanes accumulators per item folded in a fixed tree, item
// partials added in item order in double: results do not depend on the number of threads).
// Header-only templates: each including translation unit keeps its own compile options
// (cpu_kernels.cpp's loop-distribution pragma comes before its includes).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "plan.h"

// float32, float16, bfloat16 (the contract computes float64 in fp64: not these kernels)
#define FASTSAM_DISPATCH(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastsam {
namespace cpu {

constexpr int kLanes = 16;  // independent accumulators per reduction: 4 vectors of 4

template <int V>
using Int = std::integral_constant<int, V>;

// Calls f(Int<v>{}) for v in [0, Max] (ASAM exponents, ascent modes).
template <int Max, typename F>
void with_constant(int64_t v, F&& f) {
  static_assert(Max >= 1 && Max <= 2, "with_constant handles 0..2");
  TORCH_CHECK(v >= 0 && v <= Max, "fastsam: constant ", v, " out of range [0, ", Max, "]");
  if (v == 0) {
    f(Int<0>{});
  } else if (v == 1) {
    f(Int<1>{});
  } else if constexpr (Max == 2) {
    f(Int<2>{});
  }
}

template <typename T>
inline float load(T x) {
  return static_cast<float>(x);
}

template <typename F>
void for_items(const CpuItems& items, const F& per_item) {
  at::parallel_for(0, items.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) per_item(k);
  });
}

// Element-wise ops: per_segment(tensor, lo, hi) for every segment of every item, in parallel.
template <typename F>
void for_segments(const CpuItems& items, const F& per_segment) {
  for_items(items, [&](int64_t k) { items.for_each_segment(k, per_segment); });
}

// ---- 4-wide fp32 vectors for the reductions ----------------------------------------------
//
// GCC's auto-vectoriser turned the 16-lane accumulation into shuffles and stack spills
// (perf annotate) and the reduction ran at half the speed of torch's own norm on one
// 25.6M-element tensor (27.9 vs 14.7 ms, 1 thread); explicit vectors fix the code
// generation. GCC/clang vector extensions map to SSE/NEON; elsewhere a plain array.
#if defined(__GNUC__)
typedef float F32x4Storage __attribute__((vector_size(16)));
#define FASTSAM_VECTOR_EXTENSIONS 1
#else
struct F32x4Storage {
  float v[4];
  float& operator[](int i) { return v[i]; }
  float operator[](int i) const { return v[i]; }
};
#endif

struct F32x4 {
  F32x4Storage v;

  static F32x4 broadcast(float x) {
    F32x4 out;
    for (int k = 0; k < 4; ++k) out.v[k] = x;
    return out;
  }
  friend F32x4 operator+(F32x4 a, F32x4 b) {
#ifdef FASTSAM_VECTOR_EXTENSIONS
    return F32x4{a.v + b.v};
#else
    for (int k = 0; k < 4; ++k) a.v[k] += b.v[k];
    return a;
#endif
  }
  friend F32x4 operator*(F32x4 a, F32x4 b) {
#ifdef FASTSAM_VECTOR_EXTENSIONS
    return F32x4{a.v * b.v};
#else
    for (int k = 0; k < 4; ++k) a.v[k] *= b.v[k];
    return a;
#endif
  }
  friend F32x4 operator+(F32x4 a, float b) { return a + broadcast(b); }
  // |x| lane by lane (math.h finds it by argument-dependent lookup)
  friend F32x4 abs_value(F32x4 a) {
    for (int k = 0; k < 4; ++k) a.v[k] = std::fabs(a.v[k]);
    return a;
  }
};

// Four consecutive elements as fp32 (one unaligned load for float).
template <typename scalar_t>
inline F32x4 load4(const scalar_t* p) {
  F32x4 out;
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(&out.v, p, sizeof(out.v));
  } else {
    for (int k = 0; k < 4; ++k) out.v[k] = load(p[k]);
  }
  return out;
}

// kLanes fp32 accumulators as kLanes / 4 vectors; lane l adds the elements whose offset
// from the segment start is l modulo kLanes (the tail fills lanes 0, 1, ...), so results
// depend only on the data and the item boundaries.
struct Lanes {
  static constexpr int kVectors = kLanes / 4;
  F32x4 v[kVectors];

  Lanes() {
    for (auto& x : v) x = F32x4::broadcast(0.0f);
  }
  void add_scalar(int lane, float x) { v[lane / 4].v[lane % 4] += x; }
  float fold() const {  // a fixed tree over the lanes
    float level[kLanes];
    for (int l = 0; l < kLanes; ++l) level[l] = v[l / 4].v[l % 4];
    for (int width = kLanes / 2; width >= 1; width /= 2) {
      for (int l = 0; l < width; ++l) level[l] = level[2 * l] + level[2 * l + 1];
    }
    return level[0];
  }
};
static_assert(kLanes % 4 == 0, "lanes come in vectors of 4");

// W sums over all items; segment(t, lo, hi, lanes) adds into lanes[0..W).
template <int W, typename Segment>
std::array<double, W> reduce_items(const CpuItems& items, const Segment& segment) {
  std::vector<float> partials(static_cast<size_t>(items.count) * W);
  for_items(items, [&](int64_t k) {
    Lanes lanes[W];
    items.for_each_segment(k, [&](int64_t t, int64_t lo, int64_t hi) { segment(t, lo, hi, lanes); });
    for (int w = 0; w < W; ++w) partials[k * W + w] = lanes[w].fold();
  });
  std::array<double, W> total{};
  for (int64_t k = 0; k < items.count; ++k) {
    for (int w = 0; w < W; ++w) total[w] += partials[k * W + w];
  }
  return total;
}

}  // namespace cpu
}  // namespace fastsam
