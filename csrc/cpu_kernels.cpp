// CPU kernels of the fastsam ops. Work items are fixed-size ranges of the concatenation
// of all tensors (plan.h: CpuItems), run with at::parallel_for; within an item each
// (tensor, range) segment is a plain loop over flat arrays that the compiler vectorises
// (restrict pointers, one template instance per dtype and exponent). Reductions keep
// kLanes independent fp32 accumulators per item (explicit 4-wide vectors, no
// reassociation), fold them in a fixed tree into one partial per item, then add the
// partials in item order in double: the result does not depend on the number of threads.

// One pass over memory: GCC would otherwise split perturb_'s `backup[i] = w[i]` out of the
// loop into a memmove (loop distribution; seen in objdump), reading w twice, i.e. 20N
// instead of 16N bytes. File-wide, before any include, so that every function of this
// translation unit has the same options and inlining is unaffected.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "boxed.h"
#include "cpu_loops.h"
#include "eager.h"
#include "math.h"
#include "plan.h"
#include "tensor_lists.h"

namespace fastsam {
namespace {

using namespace cpu;  // cpu_loops.h: work items, 4-wide vectors, deterministic reductions

constexpr int64_t kItemSize = kCpuItemSize;

// ---- segment loops -------------------------------------------------------------------

template <typename scalar_t, int B>
inline void sumsq_segment(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w, int64_t lo,
                          int64_t hi, float eta, Lanes& acc) {
  F32x4 a[Lanes::kVectors];
  for (int j = 0; j < Lanes::kVectors; ++j) a[j] = acc.v[j];
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int j = 0; j < Lanes::kVectors; ++j) {
      const F32x4 gv = load4(g + i + 4 * j);
      if constexpr (B == 0) {
        a[j] = a[j] + math::sumsq_term<0>(gv, gv, eta);
      } else {
        a[j] = a[j] + math::sumsq_term<B>(gv, load4(w + i + 4 * j), eta);
      }
    }
  }
  for (int j = 0; j < Lanes::kVectors; ++j) acc.v[j] = a[j];
  for (int l = 0; i < hi; ++i, ++l) {
    acc.add_scalar(l, B == 0 ? math::sumsq_term<0>(load(g[i]), 0.0f, eta)
                             : math::sumsq_term<B>(load(g[i]), load(w[i]), eta));
  }
}

template <typename scalar_t>
inline void gsam_reduce_segment(const scalar_t* __restrict__ g_asc, const scalar_t* __restrict__ gp,
                                int64_t lo, int64_t hi, Lanes& dot, Lanes& sq) {
  F32x4 d[Lanes::kVectors], q[Lanes::kVectors];
  for (int j = 0; j < Lanes::kVectors; ++j) {
    d[j] = dot.v[j];
    q[j] = sq.v[j];
  }
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int j = 0; j < Lanes::kVectors; ++j) {
      const F32x4 a = load4(g_asc + i + 4 * j), p = load4(gp + i + 4 * j);
      d[j] = d[j] + math::dot_term(a, p);
      q[j] = q[j] + math::sumsq_term<0>(p, p, 0.0f);
    }
  }
  for (int j = 0; j < Lanes::kVectors; ++j) {
    dot.v[j] = d[j];
    sq.v[j] = q[j];
  }
  for (int l = 0; i < hi; ++i, ++l) {
    const float a = load(g_asc[i]), p = load(gp[i]);
    dot.add_scalar(l, math::dot_term(a, p));
    sq.add_scalar(l, math::sumsq_term<0>(p, p, 0.0f));
  }
}

// AscentMode: 0 none, 1 raw copy of g, 2 g / (||g|| + eps). Stochastic: round the new
// bf16/fp16 weights stochastically with the bits of (seed, tensor t, element i) (math.h).
template <typename scalar_t, int A, int AscentMode, bool Stochastic>
inline void perturb_segment(scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
                            scalar_t* __restrict__ backup, scalar_t* __restrict__ ascent, int64_t lo,
                            int64_t hi, float scale, float eta, float ascent_inv, uint64_t seed, int64_t t) {
  for (int64_t begin = lo; begin < hi;) {
    // the hash key changes only every 2^32 elements of a tensor
    const int64_t end = std::min(hi, ((begin >> 32) + 1) << 32);
    const uint32_t key = Stochastic ? math::rounding_key(seed, static_cast<uint32_t>(t),
                                                         static_cast<uint32_t>(begin >> 32))
                                    : 0u;
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t w_old = w[i];
      const scalar_t g_i = g[i];
      backup[i] = w_old;  // bit-exact: the stored value, not a round trip through fp32
      if constexpr (AscentMode == 1) ascent[i] = g_i;
      if constexpr (AscentMode == 2) {
        ascent[i] = static_cast<scalar_t>(math::normalized_ascent(load(g_i), ascent_inv));
      }
      const float x = math::perturbed<A>(load(w_old), load(g_i), scale, eta);
      if constexpr (Stochastic) {
        w[i] = math::stochastically_rounded<scalar_t>(x, math::rounding_bits(key, static_cast<uint32_t>(i)));
      } else {
        w[i] = static_cast<scalar_t>(x);
      }
    }
    begin = end;
  }
}

template <typename scalar_t>
inline void gsam_combine_segment(scalar_t* __restrict__ gp, const scalar_t* __restrict__ g_asc,
                                 int64_t lo, int64_t hi, math::GsamCoefficients c, float alpha) {
  for (int64_t i = lo; i < hi; ++i) {
    gp[i] = static_cast<scalar_t>(math::gsam_combined(load(gp[i]), load(g_asc[i]), c, alpha));
  }
}

template <typename scalar_t, bool Init>
inline void accumulate_segment(scalar_t* __restrict__ acc, const scalar_t* __restrict__ g, int64_t lo,
                               int64_t hi, float scale) {
  for (int64_t i = lo; i < hi; ++i) {
    const float previous = Init ? 0.0f : load(acc[i]);
    acc[i] = static_cast<scalar_t>(math::accumulated<Init>(previous, load(g[i]), scale));
  }
}

float read_scalar(const at::Tensor& t, int64_t i = 0) {
  return t.data_ptr<float>()[i];
}

uint64_t read_seed(const char* op, const at::Tensor& seed, at::Device device) {
  return static_cast<uint64_t>(seed_on(op, seed, device).data_ptr<int64_t>()[0]);
}

// ---- ops -----------------------------------------------------------------------------

at::Tensor sumsq_cpu(TensorRefs tensors, TensorRefs params, int64_t b, double eta) {
  check_exponent("sumsq", "b", b, 1);
  TORCH_CHECK(b == 0 || params.size() == tensors.size(),
              "fastsam.sumsq: b > 0 needs one parameter per tensor (T = |w| + eta)");
  at::Tensor out = at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  if (tensors.empty()) return out;
  PreparedLists prep = b == 0 ? prepare_lists("sumsq", {{"tensors", tensors, Access::Read}})
                              : prepare_lists("sumsq", {{"tensors", tensors, Access::Read},
                                                        {"params", params, Access::Read}});
  const CpuItems items(prep.flat.numels, kItemSize);
  const float eta_f = static_cast<float>(eta);
  double total = 0.0;
  FASTSAM_DISPATCH(prep.dtype, "fastsam_sumsq_cpu", [&] {
    const FlatLists& l = prep.flat;
    with_constant<1>(b, [&](auto B) {
      constexpr int kB = decltype(B)::value;
      total = reduce_items<1>(items, [&](int64_t t, int64_t lo, int64_t hi, Lanes* acc) {
        sumsq_segment<scalar_t, kB>(l.at<scalar_t>(0, t), kB ? l.at<scalar_t>(1, t) : nullptr, lo, hi, eta_f,
                                    acc[0]);
      })[0];
    });
  });
  out.data_ptr<float>()[0] = static_cast<float>(total);
  return out;
}

void perturb_cpu(TensorRefs params, TensorRefs grads, TensorRefs backups,
                 const at::Tensor& sumsq, double rho, int64_t a, double eta, double eps,
                 TensorRefs ascent, const std::optional<at::Tensor>& ascent_sumsq,
                 const std::optional<at::Tensor>& seed) {
  check_exponent("perturb_", "a", a, 2);
  if (params.empty()) return;
  const bool with_ascent = !ascent.empty();
  PreparedLists prep = prepare_perturb_lists(params, grads, backups, ascent);
  const float scale = math::perturb_scale(read_scalar(scalar_on("perturb_", "sumsq", sumsq, prep.device, 1)),
                                          static_cast<float>(rho), static_cast<float>(eps));
  const int mode = !with_ascent ? 0 : ascent_sumsq.has_value() ? 2 : 1;
  const float ascent_inv = mode == 2
      ? math::inverse_norm(read_scalar(scalar_on("perturb_", "ascent_sumsq", *ascent_sumsq, prep.device, 1)),
                           static_cast<float>(eps))
      : 0.0f;
  const float eta_f = static_cast<float>(eta);
  const bool stochastic = seed.has_value() && prep.dtype != at::kFloat;  // fp32 results need no rounding
  const uint64_t seed_value = stochastic ? read_seed("perturb_", *seed, prep.device) : 0;
  const CpuItems items(prep.flat.numels, kItemSize);
  FASTSAM_DISPATCH(prep.dtype, "fastsam_perturb_cpu", [&] {
    const FlatLists& l = prep.flat;
    with_constant<2>(a, [&](auto A) {
      with_constant<2>(mode, [&](auto Mode) {
        constexpr int kMode = decltype(Mode)::value;
        with_constant<1>(stochastic, [&](auto Stochastic) {
          constexpr bool kStochastic = decltype(Stochastic)::value && !std::is_same_v<scalar_t, float>;
          for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
            perturb_segment<scalar_t, decltype(A)::value, kMode, kStochastic>(
                l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), l.at<scalar_t>(2, t),
                kMode ? l.at<scalar_t>(3, t) : nullptr, lo, hi, scale, eta_f, ascent_inv, seed_value, t);
          });
        });
      });
    });
  });
  prep.write_back();
}

void restore_cpu(TensorRefs params, TensorRefs backups) {
  if (params.empty()) return;
  PreparedLists prep = prepare_lists(
      "restore_", {{"params", params, Access::Write}, {"backups", backups, Access::Read}});
  const CpuItems items(prep.flat.numels, kItemSize);
  const size_t itemsize = c10::elementSize(prep.dtype);
  const FlatLists& l = prep.flat;
  for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
    std::memcpy(l.at<char>(0, t) + lo * itemsize, l.at<char>(1, t) + lo * itemsize, (hi - lo) * itemsize);
  });
  prep.write_back();
}

at::Tensor gsam_reduce_cpu(TensorRefs ascent, TensorRefs grads) {
  at::Tensor out = at::zeros({2}, at::TensorOptions().dtype(at::kFloat));
  if (grads.empty()) return out;
  PreparedLists prep = prepare_lists(
      "gsam_reduce", {{"ascent", ascent, Access::Read}, {"grads", grads, Access::Read}});
  const CpuItems items(prep.flat.numels, kItemSize);
  std::array<double, 2> total{};
  FASTSAM_DISPATCH(prep.dtype, "fastsam_gsam_reduce_cpu", [&] {
    const FlatLists& l = prep.flat;
    total = reduce_items<2>(items, [&](int64_t t, int64_t lo, int64_t hi, Lanes* acc) {
      gsam_reduce_segment<scalar_t>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), lo, hi, acc[0], acc[1]);
    });
  });
  out.data_ptr<float>()[0] = static_cast<float>(total[0]);
  out.data_ptr<float>()[1] = static_cast<float>(total[1]);
  return out;
}

void gsam_combine_cpu(TensorRefs grads, TensorRefs ascent, const at::Tensor& stats, double alpha,
                      double eps) {
  if (grads.empty()) return;
  PreparedLists prep = prepare_lists(
      "gsam_combine_", {{"grads", grads, Access::ReadWrite}, {"ascent", ascent, Access::Read}});
  const at::Tensor s = scalar_on("gsam_combine_", "stats", stats, prep.device, 2);
  const auto coefficients = math::gsam_coefficients(read_scalar(s, 0), read_scalar(s, 1), static_cast<float>(eps));
  const float alpha_f = static_cast<float>(alpha);
  const CpuItems items(prep.flat.numels, kItemSize);
  FASTSAM_DISPATCH(prep.dtype, "fastsam_gsam_combine_cpu", [&] {
    const FlatLists& l = prep.flat;
    for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
      gsam_combine_segment<scalar_t>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), lo, hi, coefficients, alpha_f);
    });
  });
  prep.write_back();
}

void accumulate_cpu(TensorRefs accum, TensorRefs grads, double scale, bool init) {
  if (accum.empty()) return;
  PreparedLists prep = prepare_lists(
      "accumulate_", {{"accum", accum, init ? Access::Write : Access::ReadWrite}, {"grads", grads, Access::Read}});
  const float scale_f = static_cast<float>(scale);
  const CpuItems items(prep.flat.numels, kItemSize);
  FASTSAM_DISPATCH(prep.dtype, "fastsam_accumulate_cpu", [&] {
    const FlatLists& l = prep.flat;
    for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
      if (init) {
        accumulate_segment<scalar_t, true>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), lo, hi, scale_f);
      } else {
        accumulate_segment<scalar_t, false>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), lo, hi, scale_f);
      }
    });
  });
  prep.write_back();
}

}  // namespace

const bool cpu_table_registered = register_op_table(
    c10::DeviceType::CPU, {&sumsq_cpu, &perturb_cpu, &restore_cpu, &gsam_reduce_cpu, &gsam_combine_cpu,
                           &accumulate_cpu});

// Debug: how many threads for_items used on `items` work items (1 when the extension
// was built without OpenMP, in which case at::parallel_for runs serially).
int64_t cpu_threads_used(int64_t items) {
  TORCH_CHECK(items >= 0, "_cpu_threads_used: items must be >= 0");
  CpuItems plan(std::vector<int64_t>{items * kItemSize}, kItemSize);
  std::vector<std::atomic<int>> seen(static_cast<size_t>(std::max(at::get_num_threads(), 1)));
  for_items(plan, [&](int64_t) {
    const int tid = at::get_thread_num();
    if (tid >= 0 && static_cast<size_t>(tid) < seen.size()) seen[tid].store(1);
  });
  int64_t used = 0;
  for (auto& s : seen) used += s.load();
  return used;
}

}  // namespace fastsam

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("sumsq", fastsam::boxed<&fastsam::sumsq_cpu>());
  m.impl("perturb_", fastsam::boxed<&fastsam::perturb_cpu>());
  m.impl("restore_", fastsam::boxed<&fastsam::restore_cpu>());
  m.impl("gsam_reduce", fastsam::boxed<&fastsam::gsam_reduce_cpu>());
  m.impl("gsam_combine_", fastsam::boxed<&fastsam::gsam_combine_cpu>());
  m.impl("accumulate_", fastsam::boxed<&fastsam::accumulate_cpu>());
}
