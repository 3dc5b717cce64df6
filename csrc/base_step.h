// The fused base steps and the one-pass unperturb chain (fastsam/ops/__init__.py), on the
// host side: argument checks and list preparation shared by the CPU and CUDA
// implementations (base_step_lists.cpp), and the per-device op tables that the eager entry
// points (base_step_eager.cpp) call, registered by base_step_cpu.cpp and base_step_cuda.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>
#include <vector>

#include "tensor_lists.h"

namespace fastsam {

// ---- the ops, in schema order (base_step_ops.cpp declares the schemas) -----------------

using OptionalTensor = std::optional<at::Tensor>;

struct StepOpTable {
  void (*sgd_step)(TensorRefs params, TensorRefs grads, TensorRefs momentum_buffers, TensorRefs backups, double lr,
                   const OptionalTensor& lr_tensor, double weight_decay, double momentum, double dampening,
                   bool nesterov, bool maximize, bool first, const OptionalTensor& grad_scale,
                   const OptionalTensor& found_inf, TensorRefs ascent, const OptionalTensor& gsam_stats,
                   double alpha, double gsam_eps, TensorRefs accum, double accum_scale);
  void (*adam_step)(TensorRefs params, TensorRefs grads, TensorRefs exp_avgs, TensorRefs exp_avg_sqs,
                    TensorRefs max_exp_avg_sqs, TensorRefs steps, TensorRefs backups, double lr,
                    const OptionalTensor& lr_tensor, double beta1, double beta2, double eps, double weight_decay,
                    bool amsgrad, bool maximize, bool decoupled_weight_decay, const OptionalTensor& grad_scale,
                    const OptionalTensor& found_inf, TensorRefs ascent, const OptionalTensor& gsam_stats,
                    double alpha, double gsam_eps, TensorRefs accum, double accum_scale);
  at::Tensor (*restore_gsam_reduce)(TensorRefs params, TensorRefs backups, TensorRefs ascent, TensorRefs grads);
  void (*gsam_combine_accumulate)(TensorRefs accum, TensorRefs grads, TensorRefs ascent, const at::Tensor& stats,
                                  double alpha, double eps, double scale, bool init);
  void (*restore_accumulate)(TensorRefs params, TensorRefs backups, TensorRefs accum, TensorRefs grads,
                             double scale, bool init);
};

// Returns true, so that `static const bool x = register_step_op_table(...)` registers at load.
bool register_step_op_table(c10::DeviceType device, const StepOpTable& table);
// nullptr when no table was registered for `device`.
const StepOpTable* step_op_table(c10::DeviceType device);

// ---- list preparation ------------------------------------------------------------------------

// The lists a step kernel walks, in this order: params (written), sources (the backups, or
// the params again when none are given), grads, the optimizer state lists (read and
// written), then GSAM's ascent copy and the accumulator when given (read only).
struct StepLists {
  PreparedLists prep;
  int state_lists = 0;  // SGD: 0 or 1 (momentum); Adam: 2 or 3 (amsgrad)
  bool has_backups = false, gsam = false, accum = false;
};

// The chain and GradScaler arguments of a step, checked; tensors are fp32 on the params' device.
struct StepScalarArgs {
  at::Tensor lr, grad_scale, found_inf, gsam_stats;  // undefined when not given
  double alpha = 0.0, gsam_eps = 0.0, accum_scale = 1.0;
  bool maximize = false;
};

// may_skip: a found_inf was passed. A skipped step leaves the written lists as they were, so a
// strided one's contiguous stand-in must start as a copy (on CUDA it is copied back regardless).
StepLists prepare_sgd_lists(TensorRefs params, TensorRefs grads, TensorRefs momentum_buffers, TensorRefs backups,
                            bool momentum, bool first, bool may_skip, TensorRefs ascent, TensorRefs accum);
StepLists prepare_adam_lists(TensorRefs params, TensorRefs grads, TensorRefs exp_avgs, TensorRefs exp_avg_sqs,
                             TensorRefs max_exp_avg_sqs, TensorRefs backups, bool amsgrad, bool may_skip,
                             TensorRefs ascent, TensorRefs accum);

StepScalarArgs step_scalar_args(const char* op, at::Device device, const OptionalTensor& lr_tensor,
                                const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                                bool has_ascent, const OptionalTensor& gsam_stats, double alpha, double gsam_eps,
                                double accum_scale, bool maximize);

// Checks Adam's step counts: one 1-element float32 tensor per parameter, on `device`.
void check_steps(TensorRefs steps, size_t params, at::Device device);

void check_sgd_hyper(double lr, double momentum, double dampening, bool nesterov, bool has_buffers);
void check_adam_hyper(double lr, double beta1, double beta2, double eps, bool amsgrad, bool has_max);

}  // namespace fastsam
