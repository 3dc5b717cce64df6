// CUDA kernels of the fastsam ops: one multi-tensor-apply functor per op (the launch
// machinery is multi_tensor_apply.cuh, the arithmetic math.h, shared with the CPU), and
// the launchers declared in cuda_launch.h. Reductions write one partial per chunk and
// finish in a one-block kernel: no float atomics, bit-identical results run after run.
// Data-dependent scalars (the norm, GSAM's stats) are read by the kernels from device
// memory: nothing here waits for the GPU. No torch headers (see cuda_launch.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "cuda_launch.h"
#include "math.h"
#include "multi_tensor_apply.cuh"
#include "plan.h"

namespace fastsam {
namespace cuda {
namespace {

// list indices, named
constexpr int kParam = 0, kGrad = 1, kBackup = 2, kAscent = 3;  // perturb_

template <typename T, int B>
struct SumsqOp {  // lists: grads[, params]
  float* partials;
  float eta;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n,
                             int64_t block) const {
    float acc[1] = {0.0f};
    constexpr unsigned reads = B == 0 ? bit(0) : bit(0) | bit(1);
    for_each_element<T, reads, 0u>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) {
      if constexpr (B == 0) {
        acc[0] += math::sumsq_term<0>(load(v[0]), 0.0f, eta);
      } else {
        acc[0] += math::sumsq_term<B>(load(v[0]), load(v[Meta::kDepth - 1]), eta);
      }
    });
    block_sum_store<1>(acc, partials + block);
  }
};

// AscentMode: 0 none, 1 raw copy of g, 2 g / (||g|| + eps). Stochastic: the new bf16/fp16
// weights are rounded stochastically with the bits of (*seed, tensor, element) (math.h).
template <typename T, int AscentMode, bool Stochastic>
struct PerturbOp {  // lists: params, grads, backups[, ascent]
  const float* sumsq;
  const float* ascent_sumsq;
  const int64_t* seed;
  float rho, eta, eps;
  int a;  // ASAM exponent, a run-time branch (see math.h)
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n,
                             int64_t) const {
    const float scale = math::perturb_scale(*sumsq, rho, eps);
    const float ascent_inv = AscentMode == 2 ? math::inverse_norm(*ascent_sumsq, eps) : 0.0f;
    // the key changes only every 2^32 elements of a tensor: once per chunk, but for a chunk
    // that straddles such a boundary (possible with FASTSAM_CUDA_CHUNK_SIZE not a power of 2)
    const uint32_t tensor = static_cast<uint32_t>(meta.slot_tensor[slot]);
    const uint64_t seed_value = Stochastic ? static_cast<uint64_t>(*seed) : 0u;
    const uint32_t key = Stochastic ? math::rounding_key(seed_value, tensor, static_cast<uint32_t>(begin >> 32)) : 0u;
    constexpr unsigned writes = bit(kParam) | bit(kBackup) | (AscentMode ? bit(kAscent) : 0u);
    for_each_element<T, bit(kParam) | bit(kGrad), writes>(
        meta, slot, begin, n, [&](T(&v)[Meta::kDepth], int64_t index) {
          const float w = load(v[kParam]);
          const float g = load(v[kGrad]);
          v[kBackup] = v[kParam];  // bit-exact
          if constexpr (AscentMode == 1) v[Meta::kDepth - 1] = v[kGrad];
          if constexpr (AscentMode == 2) v[Meta::kDepth - 1] = static_cast<T>(math::normalized_ascent(g, ascent_inv));
          const float x = math::perturbed(w, g, scale, eta, a);
          if constexpr (Stochastic) {
            const uint32_t k = (index >> 32) == (begin >> 32)
                                   ? key
                                   : math::rounding_key(seed_value, tensor, static_cast<uint32_t>(index >> 32));
            v[kParam] = math::stochastically_rounded<T>(x, math::rounding_bits(k, static_cast<uint32_t>(index)));
          } else {
            v[kParam] = static_cast<T>(x);
          }
        });
  }
};

template <typename T>
struct RestoreOp {  // lists: params, backups
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n,
                             int64_t) const {
    for_each_element<T, bit(1), bit(0)>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) { v[0] = v[1]; });
  }
};

template <typename T>
struct GsamReduceOp {  // lists: ascent, grads
  float* partials;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n,
                             int64_t block) const {
    float acc[2] = {0.0f, 0.0f};
    for_each_element<T, bit(0) | bit(1), 0u>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) {
      const float a = load(v[0]), p = load(v[1]);
      acc[0] += math::dot_term(a, p);
      acc[1] += math::sumsq_term<0>(p, p, 0.0f);
    });
    block_sum_store<2>(acc, partials + 2 * block);
  }
};

template <typename T>
struct GsamCombineOp {  // lists: grads, ascent
  const float* stats;
  float alpha, eps;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n,
                             int64_t) const {
    const math::GsamCoefficients c = math::gsam_coefficients(stats[0], stats[1], eps);
    for_each_element<T, bit(0) | bit(1), bit(0)>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) {
      v[0] = static_cast<T>(math::gsam_combined(load(v[0]), load(v[1]), c, alpha));
    });
  }
};

template <typename T, bool Init>
struct AccumulateOp {  // lists: accum, grads
  float scale;
  template <typename Meta>
  __device__ void operator()(const Meta& meta, int slot, int64_t begin, int64_t n,
                             int64_t) const {
    constexpr unsigned reads = Init ? bit(1) : bit(0) | bit(1);
    for_each_element<T, reads, bit(0)>(meta, slot, begin, n, [&](T(&v)[Meta::kDepth]) {
      const float previous = Init ? 0.0f : load(v[0]);
      v[0] = static_cast<T>(math::accumulated<Init>(previous, load(v[1]), scale));
    });
  }
};

}  // namespace

bool large_params_built() { return FASTSAM_LARGE_KERNEL_PARAMS != 0; }

int64_t planned_blocks(const std::vector<int64_t>& numels) {
  int64_t blocks = 0;
  const int64_t chunk = cuda_chunk_size();
  for (int64_t n : numels) blocks += (n + chunk - 1) / chunk;
  return blocks;
}

void launch_sumsq(Dtype dtype, int b, const FlatLists& lists, float* partials, float eta, Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    if (b == 0) {
      multi_tensor_apply<1>(lists, SumsqOp<T, 0>{partials, eta}, stream);
    } else {
      multi_tensor_apply<2>(lists, SumsqOp<T, 1>{partials, eta}, stream);
    }
  });
}

void launch_perturb(Dtype dtype, int a, int ascent_mode, const FlatLists& lists, const float* sumsq,
                    const float* ascent_sumsq, const int64_t* seed, float rho, float eta, float eps, Stream stream) {
  TORCH_CHECK(a >= 0 && a <= 2 && ascent_mode >= 0 && ascent_mode <= 2, "launch_perturb: bad a or mode");
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    auto launch = [&](auto stochastic) {
      constexpr bool kStochastic = decltype(stochastic)::value && !std::is_same_v<T, float>;
      if (ascent_mode == 0) {
        multi_tensor_apply<3>(lists, PerturbOp<T, 0, kStochastic>{sumsq, ascent_sumsq, seed, rho, eta, eps, a},
                              stream);
      } else if (ascent_mode == 1) {
        multi_tensor_apply<4>(lists, PerturbOp<T, 1, kStochastic>{sumsq, ascent_sumsq, seed, rho, eta, eps, a},
                              stream);
      } else {
        multi_tensor_apply<4>(lists, PerturbOp<T, 2, kStochastic>{sumsq, ascent_sumsq, seed, rho, eta, eps, a},
                              stream);
      }
    };
    if (seed != nullptr) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
}

void launch_restore(int element_size, const FlatLists& lists, Stream stream) {
  // a bit copy: one kernel per element size, not per dtype
  switch (element_size) {
    case 2: multi_tensor_apply<2>(lists, RestoreOp<uint16_t>{}, stream); break;
    case 4: multi_tensor_apply<2>(lists, RestoreOp<uint32_t>{}, stream); break;
    default: TORCH_CHECK(false, "fastsam.restore_: unsupported element size ", element_size);
  }
}

void launch_gsam_reduce(Dtype dtype, const FlatLists& lists, float* partials, Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    multi_tensor_apply<2>(lists, GsamReduceOp<decltype(zero)>{partials}, stream);
  });
}

void launch_gsam_combine(Dtype dtype, const FlatLists& lists, const float* stats, float alpha, float eps,
                         Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    multi_tensor_apply<2>(lists, GsamCombineOp<decltype(zero)>{stats, alpha, eps}, stream);
  });
}

void launch_accumulate(Dtype dtype, bool init, const FlatLists& lists, float scale, Stream stream) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    if (init) {
      multi_tensor_apply<2>(lists, AccumulateOp<T, true>{scale}, stream);
    } else {
      multi_tensor_apply<2>(lists, AccumulateOp<T, false>{scale}, stream);
    }
  });
}

void launch_finish_sum(int width, const float* partials, int64_t count, float* out, Stream stream) {
  if (width == 1) {
    finish_sum_kernel<1><<<1, kCudaBlockThreads, 0, stream>>>(partials, count, out);
  } else {
    TORCH_CHECK(width == 2, "launch_finish_sum: width must be 1 or 2");
    finish_sum_kernel<2><<<1, kCudaBlockThreads, 0, stream>>>(partials, count, out);
  }
  check_launch("the final reduction kernel");
}

}  // namespace cuda
}  // namespace fastsam
