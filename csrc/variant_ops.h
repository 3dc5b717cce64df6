// The efficient variants' ops (looksam_project_, looksam_combine_, friendly_direction_): their
// implementations per device type, for the eager entry points (variant_eager.cpp), like
// eager.h's OpTable for the core ops. variant_cpu.cpp and variant_cuda.cpp register theirs at
// load time next to their TORCH_LIBRARY_IMPL registrations; variant_ops.cpp holds the schemas.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <Python.h>

#include "tensor_lists.h"

namespace fastsam {

struct VariantOpTable {
  void (*looksam_project)(TensorRefs gv, TensorRefs grads, TensorRefs ascent, const at::Tensor& stats, double weight,
                          bool init, double eps);
  void (*looksam_combine)(TensorRefs grads, TensorRefs gv, const at::Tensor& grad_sumsq, const at::Tensor& gv_sumsq,
                          double alpha, double eps);
  at::Tensor (*friendly_direction)(TensorRefs direction, TensorRefs ema, TensorRefs grads, double sigma, double lam,
                                   bool init);
};

// Returns true, so that `static const bool x = register_variant_op_table(...)` registers at load.
bool register_variant_op_table(c10::DeviceType device, const VariantOpTable& table);

// nullptr when no table was registered for `device` (e.g. CUDA kernels not built).
const VariantOpTable* variant_op_table(c10::DeviceType device);

// The eager entry points (fastsam._C.looksam_project_, ...), added to the module by PyInit__C.
PyMethodDef* variant_eager_methods();

}  // namespace fastsam
