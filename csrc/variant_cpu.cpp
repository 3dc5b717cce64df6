// CPU kernels of the efficient variants' ops (variant_ops.cpp), on the loops of cpu_loops.h:
// at::parallel_for over fixed-size work items, one plain loop per (tensor, range) segment,
// reductions folded deterministically. The arithmetic is variant_math.h, shared with CUDA.

// As in cpu_kernels.cpp: keep each loop one pass over memory (no loop distribution into
// memcpy/memset calls), for the whole translation unit, before any include.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "boxed.h"
#include "cpu_loops.h"
#include "tensor_lists.h"
#include "variant_math.h"
#include "variant_ops.h"

namespace fastsam {
namespace {

using namespace cpu;

constexpr int64_t kItemSize = kCpuItemSize;

float read_scalar(const at::Tensor& t, int64_t i = 0) {
  return t.data_ptr<float>()[i];
}

template <typename scalar_t, bool Init>
inline void project_segment(scalar_t* __restrict__ gv, const scalar_t* __restrict__ gs,
                            const scalar_t* __restrict__ g, int64_t lo, int64_t hi, float c, float weight) {
  for (int64_t i = lo; i < hi; ++i) {
    const float previous = Init ? 0.0f : load(gv[i]);
    gv[i] = static_cast<scalar_t>(math::projected<Init>(previous, load(gs[i]), load(g[i]), c, weight));
  }
}

template <typename scalar_t>
inline void combine_segment(scalar_t* __restrict__ g, const scalar_t* __restrict__ gv, int64_t lo, int64_t hi,
                            float coefficient) {
  for (int64_t i = lo; i < hi; ++i) g[i] = static_cast<scalar_t>(math::combined(load(g[i]), load(gv[i]), coefficient));
}

// The direction and the EMA of one element; returns the stored (rounded) direction in fp32.
template <typename scalar_t, bool Init>
inline float friendly_element(scalar_t* __restrict__ d, scalar_t* __restrict__ m, const scalar_t* __restrict__ g,
                              int64_t i, float sigma, float lam, float one_minus_lam) {
  if constexpr (Init) {
    const scalar_t gi = g[i];
    d[i] = gi;
    m[i] = gi;
    return load(gi);
  } else {
    const float gi = load(g[i]), mi = load(m[i]);
    const scalar_t di = static_cast<scalar_t>(math::friendly_direction(gi, mi, sigma));
    d[i] = di;
    m[i] = static_cast<scalar_t>(math::friendly_ema(gi, mi, lam, one_minus_lam));
    return load(di);
  }
}

// Writes the direction and the EMA, and adds the squares of the stored (rounded) direction
// into the lanes as sumsq does (element l of each 16 into lane l, the tail lane by lane), so
// the total equals sumsq of the direction. The squares come from registers: re-reading the
// just-written direction with vector loads stalled on store forwarding and ran at 56% of copy
// bandwidth on the ResNet-50 set (against 108% for the SAM sub-step, same run).
template <typename scalar_t, bool Init>
inline void friendly_segment(scalar_t* __restrict__ d, scalar_t* __restrict__ m, const scalar_t* __restrict__ g,
                             int64_t lo, int64_t hi, float sigma, float lam, float one_minus_lam, Lanes& acc) {
  F32x4 a[Lanes::kVectors];
  for (int j = 0; j < Lanes::kVectors; ++j) a[j] = acc.v[j];
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int j = 0; j < Lanes::kVectors; ++j) {
      F32x4 dv;
      for (int k = 0; k < 4; ++k) {
        dv.v[k] = friendly_element<scalar_t, Init>(d, m, g, i + 4 * j + k, sigma, lam, one_minus_lam);
      }
      a[j] = a[j] + dv * dv;
    }
  }
  for (int j = 0; j < Lanes::kVectors; ++j) acc.v[j] = a[j];
  for (int l = 0; i < hi; ++i, ++l) {
    const float di = friendly_element<scalar_t, Init>(d, m, g, i, sigma, lam, one_minus_lam);
    acc.add_scalar(l, di * di);
  }
}

void looksam_project_cpu(TensorRefs gv, TensorRefs grads, TensorRefs ascent, const at::Tensor& stats, double weight,
                         bool init, double eps) {
  if (gv.empty()) return;
  PreparedLists prep = prepare_lists("looksam_project_", {{"gv", gv, init ? Access::Write : Access::ReadWrite},
                                                          {"grads", grads, Access::Read},
                                                          {"ascent", ascent, Access::Read}});
  const at::Tensor s = scalar_on("looksam_project_", "stats", stats, prep.device, 2);
  const float c = math::projection_coefficient(read_scalar(s, 0), read_scalar(s, 1), static_cast<float>(eps));
  const float w = static_cast<float>(weight);
  const CpuItems items(prep.flat.numels, kItemSize);
  FASTSAM_DISPATCH(prep.dtype, "fastsam_looksam_project_cpu", [&] {
    const FlatLists& l = prep.flat;
    for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
      if (init) {
        project_segment<scalar_t, true>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), l.at<scalar_t>(2, t), lo, hi, c, w);
      } else {
        project_segment<scalar_t, false>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), l.at<scalar_t>(2, t), lo, hi, c,
                                         w);
      }
    });
  });
  prep.write_back();
}

void looksam_combine_cpu(TensorRefs grads, TensorRefs gv, const at::Tensor& grad_sumsq, const at::Tensor& gv_sumsq,
                         double alpha, double eps) {
  if (grads.empty()) return;
  PreparedLists prep = prepare_lists("looksam_combine_", {{"grads", grads, Access::ReadWrite},
                                                          {"gv", gv, Access::Read}});
  const float coefficient = math::reuse_coefficient(
      read_scalar(scalar_on("looksam_combine_", "grad_sumsq", grad_sumsq, prep.device, 1)),
      read_scalar(scalar_on("looksam_combine_", "gv_sumsq", gv_sumsq, prep.device, 1)), static_cast<float>(alpha),
      static_cast<float>(eps));
  const CpuItems items(prep.flat.numels, kItemSize);
  FASTSAM_DISPATCH(prep.dtype, "fastsam_looksam_combine_cpu", [&] {
    const FlatLists& l = prep.flat;
    for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
      combine_segment<scalar_t>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), lo, hi, coefficient);
    });
  });
  prep.write_back();
}

at::Tensor friendly_direction_cpu(TensorRefs direction, TensorRefs ema, TensorRefs grads, double sigma, double lam,
                                  bool init) {
  at::Tensor out = at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  if (direction.empty()) return out;
  PreparedLists prep = prepare_lists("friendly_direction_", {{"direction", direction, Access::Write},
                                                             {"ema", ema, init ? Access::Write : Access::ReadWrite},
                                                             {"grads", grads, Access::Read}});
  const float sigma_f = static_cast<float>(sigma), lam_f = static_cast<float>(lam);
  const float one_minus_lam = static_cast<float>(1.0 - lam);
  const CpuItems items(prep.flat.numels, kItemSize);
  double total = 0.0;
  FASTSAM_DISPATCH(prep.dtype, "fastsam_friendly_direction_cpu", [&] {
    const FlatLists& l = prep.flat;
    total = reduce_items<1>(items, [&](int64_t t, int64_t lo, int64_t hi, Lanes* acc) {
      if (init) {
        friendly_segment<scalar_t, true>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), l.at<scalar_t>(2, t), lo, hi,
                                         sigma_f, lam_f, one_minus_lam, acc[0]);
      } else {
        friendly_segment<scalar_t, false>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), l.at<scalar_t>(2, t), lo, hi,
                                          sigma_f, lam_f, one_minus_lam, acc[0]);
      }
    })[0];
  });
  prep.write_back();
  out.data_ptr<float>()[0] = static_cast<float>(total);
  return out;
}

}  // namespace

const bool cpu_variant_table_registered = register_variant_op_table(
    c10::DeviceType::CPU, {&looksam_project_cpu, &looksam_combine_cpu, &friendly_direction_cpu});

}  // namespace fastsam

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("looksam_project_", fastsam::boxed<&fastsam::looksam_project_cpu>());
  m.impl("looksam_combine_", fastsam::boxed<&fastsam::looksam_combine_cpu>());
  m.impl("friendly_direction_", fastsam::boxed<&fastsam::friendly_direction_cpu>());
}
