// CUDA kernels of the efficient variants' ops: one multi-tensor-apply functor per op on the
// launch machinery of multi_tensor_apply.cuh, arithmetic from variant_math.h (shared with the
// CPU). Data-dependent scalars are read from device memory; reductions write one partial per
// block and finish in launch_finish_sum's one-block kernel (fixed order, no atomics).
// No torch headers (see cuda_launch.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "multi_tensor_apply.cuh"
#include "variant_cuda_launch.h"
#include "variant_math.h"

namespace fastsam {
namespace cuda {
namespace {

template <typename T, bool Init>
struct ProjectOp {  // lists: gv, g_s, g
  const float* stats;
  float weight, eps;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n, int64_t) const {
    const float c = math::projection_coefficient(stats[0], stats[1], eps);
    constexpr unsigned reads = (Init ? 0u : bit(0)) | bit(1) | bit(2);
    for_each_element<T, reads, bit(0)>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) {
      const float previous = Init ? 0.0f : load(v[0]);
      v[0] = static_cast<T>(math::projected<Init>(previous, load(v[1]), load(v[2]), c, weight));
    });
  }
};

template <typename T>
struct CombineOp {  // lists: g, gv
  const float* grad_sumsq;
  const float* gv_sumsq;
  float alpha, eps;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n, int64_t) const {
    const float coefficient = math::reuse_coefficient(*grad_sumsq, *gv_sumsq, alpha, eps);
    for_each_element<T, bit(0) | bit(1), bit(0)>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) {
      v[0] = static_cast<T>(math::combined(load(v[0]), load(v[1]), coefficient));
    });
  }
};

template <typename T, bool Init>
struct FriendlyOp {  // lists: direction, ema, g
  float* partials;
  float sigma, lam, one_minus_lam;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n, int64_t block) const {
    float acc[1] = {0.0f};
    constexpr unsigned reads = Init ? bit(2) : bit(1) | bit(2);
    for_each_element<T, reads, bit(0) | bit(1)>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) {
      if constexpr (Init) {
        v[0] = v[2];
        v[1] = v[2];
      } else {
        const float g = load(v[2]), m = load(v[1]);
        v[0] = static_cast<T>(math::friendly_direction(g, m, sigma));
        v[1] = static_cast<T>(math::friendly_ema(g, m, lam, one_minus_lam));
      }
      const float d = load(v[0]);  // the stored, rounded direction
      acc[0] += d * d;
    });
    block_sum_store<1>(acc, partials + block);
  }
};

}  // namespace

void launch_looksam_project(Dtype dtype, bool init, const FlatLists& lists, const float* stats, float weight,
                            float eps, Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    if (init) {
      multi_tensor_apply<3>(lists, ProjectOp<T, true>{stats, weight, eps}, stream);
    } else {
      multi_tensor_apply<3>(lists, ProjectOp<T, false>{stats, weight, eps}, stream);
    }
  });
}

void launch_looksam_combine(Dtype dtype, const FlatLists& lists, const float* grad_sumsq, const float* gv_sumsq,
                            float alpha, float eps, Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    multi_tensor_apply<2>(lists, CombineOp<decltype(zero)>{grad_sumsq, gv_sumsq, alpha, eps}, stream);
  });
}

void launch_friendly_direction(Dtype dtype, bool init, const FlatLists& lists, float* partials, float sigma,
                               float lam, float one_minus_lam, Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    if (init) {
      multi_tensor_apply<3>(lists, FriendlyOp<T, true>{partials, sigma, lam, one_minus_lam}, stream);
    } else {
      multi_tensor_apply<3>(lists, FriendlyOp<T, false>{partials, sigma, lam, one_minus_lam}, stream);
    }
  });
}

}  // namespace cuda
}  // namespace fastsam
