// The boundary between the torch-facing CUDA step ops (base_step_cuda.cpp) and their kernels
// (base_step_kernels.cu): plain pointers and values only, as cuda_launch.h. Device scalars
// (lr as a tensor, grad_scale, found_inf, GSAM's stats, Adam's step counts) are pointers
// the kernels read: nothing waits for the GPU. A null pointer means "not given".
#pragma once

#include "cuda_launch.h"

namespace fastsam {
namespace cuda {

// The gradient chain every step takes (base_step_math.h: chain_direction).
struct ChainLaunch {
  const float* grad_scale;  // GradScaler: d / *grad_scale
  const float* gsam_stats;  // [<g_asc, g_p>, ||g_p||^2] with an ascent list
  float alpha, gsam_eps, accum_scale;
  bool maximize;
};

struct SgdLaunch {
  ChainLaunch chain;
  const float* lr_tensor;  // else lr
  const float* found_inf;  // nonzero: params <- sources, nothing else changes
  float lr, weight_decay, momentum, one_minus_dampening;
  bool nesterov, first, has_backups;
};

struct AdamLaunch {
  ChainLaunch chain;
  const float* lr_tensor;
  const float* found_inf;
  double lr, beta1, beta2, weight_decay;
  float eps;
  bool decoupled, has_backups;
};

// lists: params, sources, grads, [momentum_buffers], [ascent], [accum]
void launch_sgd_step(Dtype dtype, bool momentum, bool gsam, bool accum, const FlatLists& lists, const SgdLaunch& args,
                     Stream stream);
// lists: params, sources, grads, exp_avgs, exp_avg_sqs, [max_exp_avg_sqs], [ascent], [accum],
// then one float step count per position (already incremented: launch_increment_steps)
void launch_adam_step(Dtype dtype, bool amsgrad, bool gsam, bool accum, const FlatLists& lists, const AdamLaunch& args,
                      Stream stream);
// lists: the step counts (one float each): += 1 unless *found_inf != 0
void launch_increment_steps(const FlatLists& steps, const float* found_inf, Stream stream);
// lists: params, backups, ascent, grads; partials: 2 per planned block (planned_blocks)
void launch_restore_gsam_reduce(Dtype dtype, const FlatLists& lists, float* partials, Stream stream);
// lists: accum, grads, ascent
void launch_gsam_combine_accumulate(Dtype dtype, bool init, const FlatLists& lists, const float* stats, float alpha,
                                    float eps, float scale, Stream stream);
// lists: params, backups, accum, grads
void launch_restore_accumulate(Dtype dtype, bool init, const FlatLists& lists, float scale, Stream stream);

}  // namespace cuda
}  // namespace fastsam
