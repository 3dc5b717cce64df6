// The op implementations of one device type, for the eager entry points (eager.cpp),
// which call them without going through the dispatcher. cpu_kernels.cpp and cuda_ops.cpp
// register their tables at load time, next to their TORCH_LIBRARY_IMPL registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>

#include "tensor_lists.h"

namespace fastsam {

struct OpTable {
  at::Tensor (*sumsq)(TensorRefs tensors, TensorRefs params, int64_t b, double eta);
  void (*perturb)(TensorRefs params, TensorRefs grads, TensorRefs backups, const at::Tensor& sumsq, double rho,
                  int64_t a, double eta, double eps, TensorRefs ascent,
                  const std::optional<at::Tensor>& ascent_sumsq, const std::optional<at::Tensor>& seed);
  void (*restore)(TensorRefs params, TensorRefs backups);
  at::Tensor (*gsam_reduce)(TensorRefs ascent, TensorRefs grads);
  void (*gsam_combine)(TensorRefs grads, TensorRefs ascent, const at::Tensor& stats, double alpha, double eps);
  void (*accumulate)(TensorRefs accum, TensorRefs grads, double scale, bool init);
};

// Returns true, so that `static const bool x = register_op_table(...)` registers at load.
bool register_op_table(c10::DeviceType device, const OpTable& table);

// nullptr when no table was registered for `device` (e.g. CUDA kernels not built).
const OpTable* op_table(c10::DeviceType device);

}  // namespace fastsam
