// CUDA kernels of the fused base steps and the one-pass unperturb chain: one
// multi-tensor-apply functor per op over the launch machinery of multi_tensor_apply.cuh,
// the arithmetic of base_step_math.h (shared with the CPU kernels). A step walks up to 9
// lists (Adam with amsgrad, GSAM and an accumulator, plus the step counts), more than the
// other ops' 4, so its launches carry fewer tensor slots: step_slots() below. Every block
// reads the data-dependent scalars (found_inf, grad_scale, lr, GSAM's stats, its tensor's
// step count) from device memory; nothing here waits for the GPU. No torch headers.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "base_step_launch.h"
#include "base_step_math.h"
#include "multi_tensor_apply.cuh"
#include "plan.h"

namespace fastsam {
namespace cuda {
namespace {

// ---- launch arguments with up to 9 lists -------------------------------------------------
// A launch's argument is its TensorListMeta plus the op's scalars (at most kStepOpBytes).
// Slots per launch for `depth` lists within `limit` bytes: each slot takes 8 bytes of address
// per list, 8 of length, 2 x 4 of block/chunk starts and 4 of the tensor's list position;
// the meta adds 24 bytes and up to 4 of alignment padding.
constexpr size_t kStepOpBytes = 256;
constexpr int step_slots(int depth, size_t limit) {
  return static_cast<int>((limit - kStepOpBytes - 28) / (8 * static_cast<size_t>(depth) + 20));
}
template <int Depth>
using StepSmallMeta = TensorListMeta<Depth, step_slots(Depth, 4096)>;
template <int Depth>
using StepLargeMeta = TensorListMeta<Depth, step_slots(Depth, 32764)>;
static_assert(sizeof(StepSmallMeta<9>) + kStepOpBytes <= 4096 && sizeof(StepSmallMeta<3>) + kStepOpBytes <= 4096,
              "a 4 KiB step launch argument is too large");
static_assert(sizeof(StepLargeMeta<9>) + kStepOpBytes <= 32764 && sizeof(StepLargeMeta<3>) + kStepOpBytes <= 32764,
              "a 32 KiB step launch argument is too large");

// multi_tensor_apply (multi_tensor_apply.cuh) with these slot counts: the 4 KiB argument
// when the non-empty tensors fit in it or large arguments are off, else the 32 KiB one.
template <int Depth, typename Op>
void step_apply(const FlatLists& lists, const Op& op, cudaStream_t stream) {
  static_assert(sizeof(Op) <= kStepOpBytes, "a step op's scalars outgrew their room in the launch argument");
  TORCH_CHECK(lists.depth == Depth, "step_apply: expected ", Depth, " lists, got ", lists.depth);
  const int64_t chunk_size = cuda_chunk_size();
#if FASTSAM_LARGE_KERNEL_PARAMS
  int64_t tensors = 0;
  for (int64_t n : lists.numels) tensors += n > 0;
  if (cuda_large_params_requested() && tensors > StepSmallMeta<Depth>::kMaxTensors) {
    launch_planned<StepLargeMeta<Depth>>(lists, op, chunk_size, stream);
    return;
  }
#endif
  launch_planned<StepSmallMeta<Depth>>(lists, op, chunk_size, stream);
}

__device__ __forceinline__ math::ChainScalars chain_scalars(const ChainLaunch& a) {
  math::ChainScalars c;
  if (a.gsam_stats != nullptr) c.gsam = math::gsam_coefficients(a.gsam_stats[0], a.gsam_stats[1], a.gsam_eps);
  c.alpha = a.alpha;
  c.accum_scale = a.accum_scale;
  if (a.grad_scale != nullptr) c.grad_scale = *a.grad_scale;
  c.sign = a.maximize ? -1.0f : 1.0f;
  return c;
}

// found_inf: params <- sources, bit-exactly (nothing to do when the sources are the params).
template <typename T, typename Meta>
__device__ __forceinline__ void restore_sources(const Meta& meta, int slot, int64_t begin, int64_t n,
                                                bool has_backups) {
  if (!has_backups) return;
  for_each_element<T, bit(1), bit(0)>(meta, slot, begin, n, [](T(&v)[Meta::kDepth]) { v[0] = v[1]; });
}

// ---- the steps ------------------------------------------------------------------------------
// Lists: 0 params (written), 1 sources (read), 2 grads, the state, then ascent and accum.
// With momentum, the buffers are read even on the first step (4N bytes once per run; the
// value is not used): `first` stays a run-time flag instead of doubling the kernels.

template <typename T, bool Momentum, bool Gsam, bool Accum>
struct SgdStepOp {
  SgdLaunch args;
  static constexpr int kParam = 0, kSource = 1, kGrad = 2, kBuf = 3;
  static constexpr int kAscent = 3 + Momentum, kAccum = kAscent + Gsam, kDepth = kAccum + Accum;

  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n, int64_t) const {
    static_assert(Meta::kDepth == kDepth, "SgdStepOp: wrong number of lists");
    if (math::step_skipped(args.found_inf)) return restore_sources<T>(meta, slot, begin, n, args.has_backups);
    const math::ChainScalars c = chain_scalars(args.chain);
    math::SgdScalars s;
    s.neg_lr = args.lr_tensor != nullptr ? -*args.lr_tensor : -args.lr;
    s.weight_decay = args.weight_decay;
    s.momentum = args.momentum;
    s.one_minus_dampening = args.one_minus_dampening;
    s.nesterov = args.nesterov;
    s.first = args.first;
    const bool l2 = args.weight_decay != 0.0f;
    constexpr unsigned reads = bit(kSource) | bit(kGrad) | (Momentum ? bit(kBuf) : 0u) | (Gsam ? bit(kAscent) : 0u) |
                               (Accum ? bit(kAccum) : 0u);
    constexpr unsigned writes = bit(kParam) | (Momentum ? bit(kBuf) : 0u);
    for_each_element<T, reads, writes>(meta, slot, begin, n, [&](T(&v)[kDepth]) {
      float g_asc = 0.0f, acc = 0.0f, buf = 0.0f;
      if constexpr (Gsam) g_asc = load(v[kAscent]);
      if constexpr (Accum) acc = load(v[kAccum]);
      if constexpr (Momentum) buf = load(v[kBuf]);  // ignored on the first step
      const float d = math::chain_direction<Gsam, Accum>(load(v[kGrad]), g_asc, acc, c);
      const float src = load(v[kSource]);
      // weight decay: a uniform branch (both forms compiled into one kernel)
      const float w = l2 ? math::sgd_update<Momentum, true>(src, d, buf, s)
                         : math::sgd_update<Momentum, false>(src, d, buf, s);
      if constexpr (Momentum) v[kBuf] = static_cast<T>(buf);
      v[kParam] = static_cast<T>(w);
    });
  }
};

// Lists: ... 3 exp_avgs, 4 exp_avg_sqs, [5 max_exp_avg_sqs], [ascent], [accum], step counts.
template <typename T, bool Amsgrad, bool Gsam, bool Accum>
struct AdamStepOp {
  AdamLaunch args;
  static constexpr int kParam = 0, kSource = 1, kGrad = 2, kM = 3, kV = 4, kMax = 5;
  static constexpr int kAscent = 5 + Amsgrad, kAccum = kAscent + Gsam, kStep = kAccum + Accum, kDepth = kStep + 1;

  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n, int64_t) const {
    static_assert(Meta::kDepth == kDepth, "AdamStepOp: wrong number of lists");
    if (math::step_skipped(args.found_inf)) return restore_sources<T>(meta, slot, begin, n, args.has_backups);
    const math::ChainScalars c = chain_scalars(args.chain);
    math::AdamHyper h;
    h.lr_is_tensor = args.lr_tensor != nullptr;
    h.lr = h.lr_is_tensor ? static_cast<double>(*args.lr_tensor) : args.lr;
    h.beta1 = args.beta1;
    h.beta2 = args.beta2;
    h.eps = args.eps;
    h.weight_decay = args.weight_decay;
    h.decoupled = args.decoupled;
    const bool l2 = !args.decoupled && args.weight_decay != 0.0;
    const math::AdamScalars s = math::adam_scalars(h, *static_cast<const float*>(meta.addresses[kStep][slot]));
    constexpr unsigned state = bit(kM) | bit(kV) | (Amsgrad ? bit(kMax) : 0u);
    constexpr unsigned reads = bit(kSource) | bit(kGrad) | state | (Gsam ? bit(kAscent) : 0u) | (Accum ? bit(kAccum) : 0u);
    for_each_element<T, reads, bit(kParam) | state>(meta, slot, begin, n, [&](T(&v)[kDepth]) {
      float g_asc = 0.0f, acc = 0.0f;
      if constexpr (Gsam) g_asc = load(v[kAscent]);
      if constexpr (Accum) acc = load(v[kAccum]);
      const float d = math::chain_direction<Gsam, Accum>(load(v[kGrad]), g_asc, acc, c);
      const float w_src = load(v[kSource]);
      float m = load(v[kM]), sq = load(v[kV]);
      if (l2) {
        math::adam_moments<true>(w_src, d, m, sq, s);
      } else {
        math::adam_moments<false>(w_src, d, m, sq, s);
      }
      float sq_hat = sq;
      if constexpr (Amsgrad) {
        sq_hat = math::nan_maximum(load(v[kMax]), sq);
        v[kMax] = static_cast<T>(sq_hat);
      }
      v[kM] = static_cast<T>(m);
      v[kV] = static_cast<T>(sq);
      v[kParam] = static_cast<T>(math::adam_param(w_src, m, sq_hat, s));
    });
  }
};

struct IncrementStepsOp {  // lists: step counts (1 float each)
  const float* found_inf;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n, int64_t) const {
    if (math::step_skipped(found_inf)) return;
    for_each_element<float, bit(0), bit(0)>(meta, slot, begin, n, [](float(&v)[Meta::kDepth]) { v[0] += 1.0f; });
  }
};

// ---- the unperturb chain ------------------------------------------------------------------

template <typename T>
struct RestoreGsamReduceOp {  // lists: params, backups, ascent, grads
  float* partials;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n, int64_t block) const {
    float acc[2] = {0.0f, 0.0f};
    for_each_element<T, bit(1) | bit(2) | bit(3), bit(0)>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) {
      v[0] = v[1];  // bit-exact
      const float a = load(v[2]), p = load(v[3]);
      acc[0] += math::dot_term(a, p);
      acc[1] += math::sumsq_term<0>(p, p, 0.0f);
    });
    block_sum_store<2>(acc, partials + 2 * block);
  }
};

template <typename T, bool Init>
struct GsamCombineAccumulateOp {  // lists: accum, grads, ascent
  const float* stats;
  float alpha, eps, scale;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n, int64_t) const {
    const math::GsamCoefficients c = math::gsam_coefficients(stats[0], stats[1], eps);
    constexpr unsigned reads = (Init ? 0u : bit(0)) | bit(1) | bit(2);
    for_each_element<T, reads, bit(0)>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) {
      const float combined = math::gsam_combined(load(v[1]), load(v[2]), c, alpha);
      v[0] = static_cast<T>(math::accumulated<Init>(Init ? 0.0f : load(v[0]), combined, scale));
    });
  }
};

template <typename T, bool Init>
struct RestoreAccumulateOp {  // lists: params, backups, accum, grads
  float scale;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n, int64_t) const {
    constexpr unsigned reads = bit(1) | (Init ? 0u : bit(2)) | bit(3);
    for_each_element<T, reads, bit(0) | bit(2)>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) {
      v[0] = v[1];  // bit-exact
      v[2] = static_cast<T>(math::accumulated<Init>(Init ? 0.0f : load(v[2]), load(v[3]), scale));
    });
  }
};

// ---- dispatch -------------------------------------------------------------------------------

// Calls f(std::bool_constant<a>, std::bool_constant<b>, std::bool_constant<c>).
template <typename F>
void with_flags(bool a, bool b, bool c, F&& f) {
  auto last = [&](auto A, auto B) {
    if (c) f(A, B, std::true_type{}); else f(A, B, std::false_type{});
  };
  auto middle = [&](auto A) {
    if (b) last(A, std::true_type{}); else last(A, std::false_type{});
  };
  if (a) middle(std::true_type{}); else middle(std::false_type{});
}

}  // namespace

void launch_sgd_step(Dtype dtype, bool momentum, bool gsam, bool accum, const FlatLists& lists, const SgdLaunch& args,
                     Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    with_flags(momentum, gsam, accum, [&](auto M, auto G, auto A) {
      using Op = SgdStepOp<T, decltype(M)::value, decltype(G)::value, decltype(A)::value>;
      step_apply<Op::kDepth>(lists, Op{args}, stream);
    });
  });
}

void launch_adam_step(Dtype dtype, bool amsgrad, bool gsam, bool accum, const FlatLists& lists, const AdamLaunch& args,
                      Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    with_flags(amsgrad, gsam, accum, [&](auto M, auto G, auto A) {
      using Op = AdamStepOp<T, decltype(M)::value, decltype(G)::value, decltype(A)::value>;
      step_apply<Op::kDepth>(lists, Op{args}, stream);
    });
  });
}

void launch_increment_steps(const FlatLists& steps, const float* found_inf, Stream stream) {
  multi_tensor_apply<1>(steps, IncrementStepsOp{found_inf}, stream);
}

void launch_restore_gsam_reduce(Dtype dtype, const FlatLists& lists, float* partials, Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    multi_tensor_apply<4>(lists, RestoreGsamReduceOp<decltype(zero)>{partials}, stream);
  });
}

void launch_gsam_combine_accumulate(Dtype dtype, bool init, const FlatLists& lists, const float* stats, float alpha,
                                    float eps, float scale, Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    if (init) {
      multi_tensor_apply<3>(lists, GsamCombineAccumulateOp<T, true>{stats, alpha, eps, scale}, stream);
    } else {
      multi_tensor_apply<3>(lists, GsamCombineAccumulateOp<T, false>{stats, alpha, eps, scale}, stream);
    }
  });
}

void launch_restore_accumulate(Dtype dtype, bool init, const FlatLists& lists, float scale, Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    if (init) {
      multi_tensor_apply<4>(lists, RestoreAccumulateOp<T, true>{scale}, stream);
    } else {
      multi_tensor_apply<4>(lists, RestoreAccumulateOp<T, false>{scale}, stream);
    }
  });
}

}  // namespace cuda
}  // namespace fastsam
