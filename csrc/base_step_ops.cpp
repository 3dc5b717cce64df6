// Schemas and meta kernels of the fused base steps and the one-pass unperturb chain
// (semantics: fastsam/ops/__init__.py). The CPU kernels are base_step_cpu.cpp, the CUDA
// ones base_step_cuda.cpp; the eager entry points base_step_eager.cpp.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

namespace fastsam {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

// ---- meta kernels: the in-place ops return nothing; restore_gsam_reduce returns [2] fp32 ----

void sgd_step_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, const OptionalTensor&,
                   double, double, double, bool, bool, bool, const OptionalTensor&, const OptionalTensor&,
                   at::TensorList, const OptionalTensor&, double, double, at::TensorList, double) {}

void adam_step_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    at::TensorList, double, const OptionalTensor&, double, double, double, double, bool, bool, bool,
                    const OptionalTensor&, const OptionalTensor&, at::TensorList, const OptionalTensor&, double,
                    double, at::TensorList, double) {}

at::Tensor restore_gsam_reduce_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList grads) {
  auto options = at::TensorOptions().dtype(at::kFloat).device(
      grads.empty() ? at::Device(at::kMeta) : grads[0].device());
  return at::empty({2}, options);
}

void gsam_combine_accumulate_meta(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, double, double,
                                  double, bool) {}

void restore_accumulate_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, bool) {}

}  // namespace
}  // namespace fastsam

TORCH_LIBRARY_FRAGMENT(fastsam, m) {
  // Empty lists mean "not given": backups (the step reads the parameters, like torch.optim),
  // momentum_buffers (momentum 0), max_exp_avg_sqs (no amsgrad), ascent (no GSAM), accum
  // (no accumulator). lr_tensor, when given, replaces lr; fastsam/ops/compiled.py passes
  // [] and None for the Python API's None.
  m.def("sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] backups, "
        "float lr, Tensor? lr_tensor, float weight_decay, float momentum, float dampening, bool nesterov, "
        "bool maximize, bool first, Tensor? grad_scale, Tensor? found_inf, Tensor[] ascent, Tensor? gsam_stats, "
        "float alpha, float gsam_eps, Tensor[] accum, float accum_scale) -> ()");
  m.def("adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor[] backups, float lr, Tensor? lr_tensor, "
        "float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, "
        "bool decoupled_weight_decay, Tensor? grad_scale, Tensor? found_inf, Tensor[] ascent, Tensor? gsam_stats, "
        "float alpha, float gsam_eps, Tensor[] accum, float accum_scale) -> ()");
  m.def("restore_gsam_reduce(Tensor(a!)[] params, Tensor[] backups, Tensor[] ascent, Tensor[] grads) -> Tensor");
  m.def("gsam_combine_accumulate_(Tensor(a!)[] accum, Tensor[] grads, Tensor[] ascent, Tensor stats, float alpha, "
        "float eps, float scale, bool init) -> ()");
  m.def("restore_accumulate_(Tensor(a!)[] params, Tensor[] backups, Tensor(b!)[] accum, Tensor[] grads, "
        "float scale, bool init) -> ()");
}

TORCH_LIBRARY_IMPL(fastsam, Meta, m) {
  m.impl("sgd_step_", &fastsam::sgd_step_meta);
  m.impl("adam_step_", &fastsam::adam_step_meta);
  m.impl("restore_gsam_reduce", &fastsam::restore_gsam_reduce_meta);
  m.impl("gsam_combine_accumulate_", &fastsam::gsam_combine_accumulate_meta);
  m.impl("restore_accumulate_", &fastsam::restore_accumulate_meta);
}
