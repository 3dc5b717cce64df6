// CPU kernels of the fused base steps (sgd_step_, adam_step_) and of the one-pass unperturb
// chain (restore_gsam_reduce, gsam_combine_accumulate_, restore_accumulate_). The same work
// items as the other CPU kernels (plan.h: CpuItems, at::parallel_for); every segment is one
// loop over flat arrays that loads each operand once, computes in fp32 (base_step_math.h)
// and rounds each result once into the tensor's dtype. Data-dependent scalars (found_inf,
// grad_scale, GSAM's stats, Adam's step counts, a tensor lr) are CPU tensors, read here.

// One pass over memory: without this GCC may split `w[i] = backup[i]` out of a loop into a
// memmove (loop distribution), reading the backup twice (see cpu_kernels.cpp). The Adam loops
// also need setup.py's -fno-math-errno (a pragma does not reach sqrtf's expansion).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "base_step.h"
#include "base_step_math.h"
#include "boxed.h"
#include "plan.h"

// float32, float16, bfloat16 (float64 is the foreach backend's)
#define FASTSAM_STEP_DISPATCH(TYPE, NAME, ...)                              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastsam {
namespace {

template <typename T>
inline float load(T x) {
  return static_cast<float>(x);
}

float host_value(const at::Tensor& t, int64_t i = 0) {
  return t.data_ptr<float>()[i];
}

// per_segment(tensor, lo, hi) for every segment of every item, in parallel.
template <typename F>
void for_segments(const CpuItems& items, const F& per_segment) {
  at::parallel_for(0, items.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) items.for_each_segment(k, per_segment);
  });
}

// with_flags(f, a, b, ...) calls f(std::bool_constant<a>{}, std::bool_constant<b>{}, ...).
template <typename F>
void with_flags(F&& f) {
  f();
}
template <typename F, typename... Rest>
void with_flags(F&& f, bool flag, Rest... rest) {
  if (flag) {
    with_flags([&](auto... b) { f(std::true_type{}, b...); }, rest...);
  } else {
    with_flags([&](auto... b) { f(std::false_type{}, b...); }, rest...);
  }
}

math::ChainScalars chain_scalars(const StepScalarArgs& a) {
  math::ChainScalars c;
  if (a.gsam_stats.defined()) {
    c.gsam = math::gsam_coefficients(host_value(a.gsam_stats, 0), host_value(a.gsam_stats, 1),
                                     static_cast<float>(a.gsam_eps));
  }
  c.alpha = static_cast<float>(a.alpha);
  c.accum_scale = static_cast<float>(a.accum_scale);
  if (a.grad_scale.defined()) c.grad_scale = host_value(a.grad_scale);
  c.sign = a.maximize ? -1.0f : 1.0f;
  return c;
}

bool skipped(const StepScalarArgs& a) {
  return a.found_inf.defined() && host_value(a.found_inf) != 0.0f;
}

// found_inf: the parameters end up equal to their sources (a bit copy of the backups).
void restore_sources(StepLists& sl) {
  if (!sl.has_backups) return;  // the sources are the parameters: nothing changes
  const CpuItems items(sl.prep.flat.numels, kCpuItemSize);
  const size_t itemsize = c10::elementSize(sl.prep.dtype);
  const FlatLists& l = sl.prep.flat;
  for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
    std::memcpy(l.at<char>(0, t) + lo * itemsize, l.at<char>(1, t) + lo * itemsize, (hi - lo) * itemsize);
  });
  sl.prep.write_back();
}

// ---- instruction sets ----------------------------------------------------------------
// torch's own fused CPU optimizers run AVX2/AVX-512 code chosen at run time; the extension is
// built for the baseline ISA (SSE2 on x86-64). The step loops are therefore also compiled for
// AVX2 and AVX-512 (the segment functions are forced inline into a wrapper per target) and
// chosen per segment by what the CPU supports. GCC contracts a * b + c into FMAs where the
// target has them (AVX-512 here), so results can differ from the SSE2 build by an ulp; the
// tests' fp32 tolerance is ~80 ulps. Measured on the shared 2-core AVX-512 VM (load ~5), one
// thread, 25M elements from backups, medians of 9 (two runs each), baseline vs dispatched:
// fp32 adam_step_ 45 vs 39-40 ms, sgd_step_ (momentum) 35 vs 30 ms; bf16 sgd_step_ 33 vs
// 18.5 ms; bf16 adam_step_ 118 vs 117 ms (its conversions stay scalar).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTSAM_LOOP inline __attribute__((always_inline))
#define FASTSAM_ISA_DISPATCH 1
#else
#define FASTSAM_LOOP inline
#define FASTSAM_ISA_DISPATCH 0
#endif

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa cpu_isa() {
#if FASTSAM_ISA_DISPATCH
  static const Isa isa = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
                             ? Isa::kAvx512
                         : __builtin_cpu_supports("avx2") ? Isa::kAvx2
                                                          : Isa::kBaseline;
  return isa;
#else
  return Isa::kBaseline;
#endif
}

#if FASTSAM_ISA_DISPATCH
template <auto Loop, typename... A>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void loop_avx512(A... args) {
  Loop(args...);
}
template <auto Loop, typename... A>
__attribute__((target("avx2"))) void loop_avx2(A... args) {
  Loop(args...);
}
#endif

// Loop(args...) compiled for the best instruction set this CPU has.
template <auto Loop, typename... A>
void run_loop(A... args) {
#if FASTSAM_ISA_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512: return loop_avx512<Loop>(args...);
    case Isa::kAvx2: return loop_avx2<Loop>(args...);
    case Isa::kBaseline: break;
  }
#endif
  Loop(args...);
}

// ---- segment loops -------------------------------------------------------------------
// The sources may be the parameters themselves (no backups), so no __restrict__ on those two;
// ivdep tells the vectoriser what holds either way: no dependence between iterations (each
// element is read, then written, in its own iteration). Without it GCC needs more run-time
// alias checks than it allows and leaves the loops scalar.

template <typename T, bool Momentum, bool L2, bool Gsam, bool Accum>
FASTSAM_LOOP void sgd_segment(T* w, const T* src, const T* g, T* buf, const T* asc, const T* acc, int64_t lo, int64_t hi,
                 const math::ChainScalars& c, const math::SgdScalars& s) {
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i) {
    const float d = math::chain_direction<Gsam, Accum>(load(g[i]), Gsam ? load(asc[i]) : 0.0f,
                                                       Accum ? load(acc[i]) : 0.0f, c);
    float b = Momentum ? load(buf[i]) : 0.0f;  // ignored on the first step (the select in sgd_update)
    const float w_new = math::sgd_update<Momentum, L2>(load(src[i]), d, b, s);
    if constexpr (Momentum) buf[i] = static_cast<T>(b);
    w[i] = static_cast<T>(w_new);
  }
}

template <typename T, bool Amsgrad, bool L2, bool Gsam, bool Accum>
FASTSAM_LOOP void adam_segment(T* w, const T* src, const T* g, T* m, T* v, T* vmax, const T* asc, const T* acc, int64_t lo,
                  int64_t hi, const math::ChainScalars& c, const math::AdamScalars& s) {
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i) {
    const float d = math::chain_direction<Gsam, Accum>(load(g[i]), Gsam ? load(asc[i]) : 0.0f,
                                                       Accum ? load(acc[i]) : 0.0f, c);
    const float w_src = load(src[i]);
    float m_i = load(m[i]), v_i = load(v[i]);
    math::adam_moments<L2>(w_src, d, m_i, v_i, s);
    float v_hat = v_i;
    if constexpr (Amsgrad) {
      v_hat = math::nan_maximum(load(vmax[i]), v_i);
      vmax[i] = static_cast<T>(v_hat);
    }
    m[i] = static_cast<T>(m_i);
    v[i] = static_cast<T>(v_i);
    w[i] = static_cast<T>(math::adam_param(w_src, m_i, v_hat, s));
  }
}

// GSAM's two sums with kLanes independent fp32 accumulators (lane l takes the elements at
// offset l modulo kLanes from the segment start), folded in a fixed tree: the result
// depends only on the data and the item boundaries, not on the thread count.
constexpr int kLanes = 16;

struct Lanes {
  float v[kLanes] = {};
  float fold() const {
    float level[kLanes];
    for (int l = 0; l < kLanes; ++l) level[l] = v[l];
    for (int width = kLanes / 2; width >= 1; width /= 2) {
      for (int l = 0; l < width; ++l) level[l] = level[2 * l] + level[2 * l + 1];
    }
    return level[0];
  }
};

// w <- backup while summing <g_asc, g_p> and ||g_p||^2.
template <typename T>
void restore_reduce_segment(T* __restrict__ w, const T* __restrict__ backup, const T* __restrict__ asc,
                            const T* __restrict__ g, int64_t lo, int64_t hi, Lanes& dot, Lanes& sq) {
  float d[kLanes], q[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    d[l] = dot.v[l];
    q[l] = sq.v[l];
  }
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      w[i + l] = backup[i + l];  // bit-exact
      const float a = load(asc[i + l]), p = load(g[i + l]);
      d[l] += math::dot_term(a, p);
      q[l] += math::sumsq_term<0>(p, p, 0.0f);
    }
  }
  for (int l = 0; i < hi; ++i, ++l) {
    w[i] = backup[i];
    const float a = load(asc[i]), p = load(g[i]);
    d[l] += math::dot_term(a, p);
    q[l] += math::sumsq_term<0>(p, p, 0.0f);
  }
  for (int l = 0; l < kLanes; ++l) {
    dot.v[l] = d[l];
    sq.v[l] = q[l];
  }
}

template <typename T, bool Init>
void combine_accumulate_segment(T* __restrict__ acc, const T* __restrict__ g, const T* __restrict__ asc, int64_t lo,
                                int64_t hi, math::GsamCoefficients c, float alpha, float scale) {
  for (int64_t i = lo; i < hi; ++i) {
    const float combined = math::gsam_combined(load(g[i]), load(asc[i]), c, alpha);
    acc[i] = static_cast<T>(math::accumulated<Init>(Init ? 0.0f : load(acc[i]), combined, scale));
  }
}

template <typename T, bool Init>
void restore_accumulate_segment(T* __restrict__ w, const T* __restrict__ backup, T* __restrict__ acc,
                                const T* __restrict__ g, int64_t lo, int64_t hi, float scale) {
  for (int64_t i = lo; i < hi; ++i) {
    w[i] = backup[i];  // bit-exact
    acc[i] = static_cast<T>(math::accumulated<Init>(Init ? 0.0f : load(acc[i]), load(g[i]), scale));
  }
}

// ---- ops -----------------------------------------------------------------------------

void sgd_step_cpu(TensorRefs params, TensorRefs grads, TensorRefs momentum_buffers, TensorRefs backups, double lr,
                  const OptionalTensor& lr_tensor, double weight_decay, double momentum, double dampening,
                  bool nesterov, bool maximize, bool first, const OptionalTensor& grad_scale,
                  const OptionalTensor& found_inf, TensorRefs ascent, const OptionalTensor& gsam_stats, double alpha,
                  double gsam_eps, TensorRefs accum, double accum_scale) {
  check_sgd_hyper(lr, momentum, dampening, nesterov, !momentum_buffers.empty());
  if (params.empty()) return;
  StepLists sl = prepare_sgd_lists(params, grads, momentum_buffers, backups, momentum != 0.0, first,
                                   found_inf.has_value(), ascent, accum);
  const StepScalarArgs a = step_scalar_args("sgd_step_", sl.prep.device, lr_tensor, grad_scale, found_inf,
                                            sl.gsam, gsam_stats, alpha, gsam_eps, accum_scale, maximize);
  if (skipped(a)) return restore_sources(sl);
  const math::ChainScalars c = chain_scalars(a);
  math::SgdScalars s;
  s.neg_lr = a.lr.defined() ? -host_value(a.lr) : static_cast<float>(-lr);
  s.weight_decay = static_cast<float>(weight_decay);
  s.momentum = static_cast<float>(momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - dampening);
  s.nesterov = nesterov;
  s.first = first;
  const CpuItems items(sl.prep.flat.numels, kCpuItemSize);
  const FlatLists& l = sl.prep.flat;
  const int ascent_list = 3 + sl.state_lists, accum_list = ascent_list + sl.gsam;
  FASTSAM_STEP_DISPATCH(sl.prep.dtype, "fastsam_sgd_step_cpu", [&] {
    with_flags([&](auto M, auto L2, auto G, auto A) {
      constexpr bool kM = decltype(M)::value, kL2 = decltype(L2)::value;
      constexpr bool kG = decltype(G)::value, kA = decltype(A)::value;
      for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
        run_loop<&sgd_segment<scalar_t, kM, kL2, kG, kA>>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), l.at<scalar_t>(2, t),
                                          kM ? l.at<scalar_t>(3, t) : nullptr,
                                          kG ? l.at<scalar_t>(ascent_list, t) : nullptr,
                                          kA ? l.at<scalar_t>(accum_list, t) : nullptr, lo, hi, c, s);
      });
    }, sl.state_lists == 1, weight_decay != 0.0, sl.gsam, sl.accum);
  });
  sl.prep.write_back();
}

void adam_step_cpu(TensorRefs params, TensorRefs grads, TensorRefs exp_avgs, TensorRefs exp_avg_sqs,
                   TensorRefs max_exp_avg_sqs, TensorRefs steps, TensorRefs backups, double lr,
                   const OptionalTensor& lr_tensor, double beta1, double beta2, double eps, double weight_decay,
                   bool amsgrad, bool maximize, bool decoupled_weight_decay, const OptionalTensor& grad_scale,
                   const OptionalTensor& found_inf, TensorRefs ascent, const OptionalTensor& gsam_stats,
                   double alpha, double gsam_eps, TensorRefs accum, double accum_scale) {
  check_adam_hyper(lr, beta1, beta2, eps, amsgrad, !max_exp_avg_sqs.empty());
  if (params.empty()) return;
  StepLists sl = prepare_adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, backups, amsgrad,
                                    found_inf.has_value(), ascent, accum);
  check_steps(steps, params.size(), sl.prep.device);
  const StepScalarArgs a = step_scalar_args("adam_step_", sl.prep.device, lr_tensor, grad_scale, found_inf,
                                            sl.gsam, gsam_stats, alpha, gsam_eps, accum_scale, maximize);
  if (skipped(a)) return restore_sources(sl);  // step counts unchanged too
  const math::ChainScalars c = chain_scalars(a);
  math::AdamHyper h;
  h.lr_is_tensor = a.lr.defined();
  h.lr = h.lr_is_tensor ? static_cast<double>(host_value(a.lr)) : lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = static_cast<float>(eps);
  h.weight_decay = weight_decay;
  h.decoupled = decoupled_weight_decay;
  // torch: step_t += 1 for every parameter (empty ones too), then bias corrections from it
  std::vector<math::AdamScalars> per_tensor(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    float* step = steps[i].mutable_data_ptr<float>();
    *step += 1.0f;
    per_tensor[i] = math::adam_scalars(h, *step);
  }
  const CpuItems items(sl.prep.flat.numels, kCpuItemSize);
  const FlatLists& l = sl.prep.flat;
  const int ascent_list = 3 + sl.state_lists, accum_list = ascent_list + sl.gsam;
  FASTSAM_STEP_DISPATCH(sl.prep.dtype, "fastsam_adam_step_cpu", [&] {
    with_flags([&](auto M, auto L2, auto G, auto A) {
      constexpr bool kM = decltype(M)::value, kL2 = decltype(L2)::value;
      constexpr bool kG = decltype(G)::value, kA = decltype(A)::value;
      for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
        run_loop<&adam_segment<scalar_t, kM, kL2, kG, kA>>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), l.at<scalar_t>(2, t),
                                           l.at<scalar_t>(3, t), l.at<scalar_t>(4, t),
                                           kM ? l.at<scalar_t>(5, t) : nullptr,
                                           kG ? l.at<scalar_t>(ascent_list, t) : nullptr,
                                           kA ? l.at<scalar_t>(accum_list, t) : nullptr, lo, hi, c, per_tensor[t]);
      });
    }, amsgrad, weight_decay != 0.0 && !decoupled_weight_decay, sl.gsam, sl.accum);
  });
  sl.prep.write_back();
}

at::Tensor restore_gsam_reduce_cpu(TensorRefs params, TensorRefs backups, TensorRefs ascent, TensorRefs grads) {
  at::Tensor out = at::zeros({2}, at::TensorOptions().dtype(at::kFloat));
  if (grads.empty()) return out;
  TORCH_CHECK(params.size() == grads.size(), "fastsam.restore_gsam_reduce: params has ", params.size(),
              " tensors but grads has ", grads.size());
  PreparedLists prep = prepare_lists("restore_gsam_reduce", {{"params", params, Access::Write},
                                                             {"backups", backups, Access::Read},
                                                             {"ascent", ascent, Access::Read},
                                                             {"grads", grads, Access::Read}});
  const CpuItems items(prep.flat.numels, kCpuItemSize);
  std::vector<float> partials(static_cast<size_t>(items.count) * 2);
  FASTSAM_STEP_DISPATCH(prep.dtype, "fastsam_restore_gsam_reduce_cpu", [&] {
    const FlatLists& l = prep.flat;
    at::parallel_for(0, items.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        Lanes dot, sq;
        items.for_each_segment(k, [&](int64_t t, int64_t lo, int64_t hi) {
          restore_reduce_segment<scalar_t>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), l.at<scalar_t>(2, t),
                                                 l.at<scalar_t>(3, t), lo, hi, dot, sq);
        });
        partials[2 * k] = dot.fold();
        partials[2 * k + 1] = sq.fold();
      }
    });
  });
  double total[2] = {0.0, 0.0};
  for (int64_t k = 0; k < items.count; ++k) {  // item order: independent of the thread count
    total[0] += partials[2 * k];
    total[1] += partials[2 * k + 1];
  }
  prep.write_back();
  out.data_ptr<float>()[0] = static_cast<float>(total[0]);
  out.data_ptr<float>()[1] = static_cast<float>(total[1]);
  return out;
}

void gsam_combine_accumulate_cpu(TensorRefs accum, TensorRefs grads, TensorRefs ascent, const at::Tensor& stats,
                                 double alpha, double eps, double scale, bool init) {
  if (accum.empty()) return;
  PreparedLists prep = prepare_lists("gsam_combine_accumulate_",
                                     {{"accum", accum, init ? Access::Write : Access::ReadWrite},
                                      {"grads", grads, Access::Read},
                                      {"ascent", ascent, Access::Read}});
  const at::Tensor s = scalar_on("gsam_combine_accumulate_", "stats", stats, prep.device, 2);
  const auto c = math::gsam_coefficients(host_value(s, 0), host_value(s, 1), static_cast<float>(eps));
  const float alpha_f = static_cast<float>(alpha), scale_f = static_cast<float>(scale);
  const CpuItems items(prep.flat.numels, kCpuItemSize);
  FASTSAM_STEP_DISPATCH(prep.dtype, "fastsam_gsam_combine_accumulate_cpu", [&] {
    const FlatLists& l = prep.flat;
    for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
      if (init) {
        combine_accumulate_segment<scalar_t, true>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), l.at<scalar_t>(2, t),
                                                   lo, hi, c, alpha_f, scale_f);
      } else {
        combine_accumulate_segment<scalar_t, false>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t),
                                                    l.at<scalar_t>(2, t), lo, hi, c, alpha_f, scale_f);
      }
    });
  });
  prep.write_back();
}

void restore_accumulate_cpu(TensorRefs params, TensorRefs backups, TensorRefs accum, TensorRefs grads, double scale,
                            bool init) {
  if (params.empty()) return;
  PreparedLists prep = prepare_lists("restore_accumulate_", {{"params", params, Access::Write},
                                                             {"backups", backups, Access::Read},
                                                             {"accum", accum, init ? Access::Write : Access::ReadWrite},
                                                             {"grads", grads, Access::Read}});
  const float scale_f = static_cast<float>(scale);
  const CpuItems items(prep.flat.numels, kCpuItemSize);
  FASTSAM_STEP_DISPATCH(prep.dtype, "fastsam_restore_accumulate_cpu", [&] {
    const FlatLists& l = prep.flat;
    for_segments(items, [&](int64_t t, int64_t lo, int64_t hi) {
      if (init) {
        restore_accumulate_segment<scalar_t, true>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t), l.at<scalar_t>(2, t),
                                                   l.at<scalar_t>(3, t), lo, hi, scale_f);
      } else {
        restore_accumulate_segment<scalar_t, false>(l.at<scalar_t>(0, t), l.at<scalar_t>(1, t),
                                                    l.at<scalar_t>(2, t), l.at<scalar_t>(3, t), lo, hi, scale_f);
      }
    });
  });
  prep.write_back();
}

}  // namespace

const bool cpu_step_table_registered = register_step_op_table(
    c10::DeviceType::CPU, {&sgd_step_cpu, &adam_step_cpu, &restore_gsam_reduce_cpu, &gsam_combine_accumulate_cpu,
                           &restore_accumulate_cpu});

}  // namespace fastsam

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("sgd_step_", fastsam::boxed<&fastsam::sgd_step_cpu>());
  m.impl("adam_step_", fastsam::boxed<&fastsam::adam_step_cpu>());
  m.impl("restore_gsam_reduce", fastsam::boxed<&fastsam::restore_gsam_reduce_cpu>());
  m.impl("gsam_combine_accumulate_", fastsam::boxed<&fastsam::gsam_combine_accumulate_cpu>());
  m.impl("restore_accumulate_", fastsam::boxed<&fastsam::restore_accumulate_cpu>());
}
