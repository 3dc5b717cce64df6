// The CUDA implementations of the fused base steps and the unperturb chain, on the torch
// side: checks and layout staging (base_step.h), device guard and current stream, then the
// launchers of base_step_kernels.cu. Everything is queued on the current stream; device
// scalars are passed by address, so nothing waits for the GPU.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_torch.h"
#include "base_step.h"
#include "base_step_launch.h"
#include "boxed.h"

namespace fastsam {
namespace cuda {
namespace {

const float* pointer_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

ChainLaunch chain_launch(const StepScalarArgs& a) {
  return ChainLaunch{pointer_or_null(a.grad_scale), pointer_or_null(a.gsam_stats), static_cast<float>(a.alpha),
                     static_cast<float>(a.gsam_eps), static_cast<float>(a.accum_scale), a.maximize};
}

void sgd_step_cuda(TensorRefs params, TensorRefs grads, TensorRefs momentum_buffers, TensorRefs backups, double lr,
                   const OptionalTensor& lr_tensor, double weight_decay, double momentum, double dampening,
                   bool nesterov, bool maximize, bool first, const OptionalTensor& grad_scale,
                   const OptionalTensor& found_inf, TensorRefs ascent, const OptionalTensor& gsam_stats,
                   double alpha, double gsam_eps, TensorRefs accum, double accum_scale) {
  check_sgd_hyper(lr, momentum, dampening, nesterov, !momentum_buffers.empty());
  if (params.empty()) return;
  StepLists sl = prepare_sgd_lists(params, grads, momentum_buffers, backups, momentum != 0.0, first,
                                   found_inf.has_value(), ascent, accum);
  const c10::cuda::CUDAGuard guard(sl.prep.device);
  const StepScalarArgs a = step_scalar_args("sgd_step_", sl.prep.device, lr_tensor, grad_scale, found_inf, sl.gsam,
                                            gsam_stats, alpha, gsam_eps, accum_scale, maximize);
  SgdLaunch args{chain_launch(a), pointer_or_null(a.lr), pointer_or_null(a.found_inf), static_cast<float>(lr),
                 static_cast<float>(weight_decay), static_cast<float>(momentum),
                 static_cast<float>(1.0 - dampening), nesterov, first, sl.has_backups};
  launch_sgd_step(dtype_of(sl.prep.dtype), sl.state_lists == 1, sl.gsam, sl.accum, sl.prep.flat, args,
                  current_stream(sl.prep.device));
  sl.prep.write_back();
}

void adam_step_cuda(TensorRefs params, TensorRefs grads, TensorRefs exp_avgs, TensorRefs exp_avg_sqs,
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
  const c10::cuda::CUDAGuard guard(sl.prep.device);
  const Stream stream = current_stream(sl.prep.device);
  const StepScalarArgs a = step_scalar_args("adam_step_", sl.prep.device, lr_tensor, grad_scale, found_inf, sl.gsam,
                                            gsam_stats, alpha, gsam_eps, accum_scale, maximize);
  // torch: step_t += 1 for every parameter (empty ones too), unless the step is skipped
  FlatLists step_lists;
  step_lists.depth = 1;
  step_lists.numels.assign(steps.size(), 1);
  for (size_t i = 0; i < steps.size(); ++i) step_lists.addresses[0].push_back(steps[i].mutable_data_ptr());
  launch_increment_steps(step_lists, pointer_or_null(a.found_inf), stream);
  // the kernels read each tensor's (incremented) count through one more address list
  FlatLists lists = sl.prep.flat;
  TORCH_CHECK(lists.depth < kMaxLists, "fastsam.adam_step_: too many tensor lists (internal error)");
  lists.addresses[lists.depth++] = step_lists.addresses[0];
  AdamLaunch args{chain_launch(a), pointer_or_null(a.lr), pointer_or_null(a.found_inf), lr, beta1, beta2,
                  weight_decay, static_cast<float>(eps), decoupled_weight_decay, sl.has_backups};
  launch_adam_step(dtype_of(sl.prep.dtype), amsgrad, sl.gsam, sl.accum, lists, args, stream);
  sl.prep.write_back();
}

at::Tensor restore_gsam_reduce_cuda(TensorRefs params, TensorRefs backups, TensorRefs ascent, TensorRefs grads) {
  TORCH_CHECK(!grads.empty(), "fastsam.restore_gsam_reduce: empty list (the Python wrapper answers it)");
  PreparedLists prep = prepare_lists("restore_gsam_reduce", {{"params", params, Access::Write},
                                                             {"backups", backups, Access::Read},
                                                             {"ascent", ascent, Access::Read},
                                                             {"grads", grads, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  const Stream stream = current_stream(prep.device);
  const int64_t blocks = planned_blocks(prep.flat.numels);
  const auto options = at::TensorOptions().dtype(at::kFloat).device(prep.device);
  at::Tensor partials = at::empty({2 * blocks}, options);
  at::Tensor out = at::empty({2}, options);
  launch_restore_gsam_reduce(dtype_of(prep.dtype), prep.flat, partials.data_ptr<float>(), stream);
  launch_finish_sum(2, partials.data_ptr<float>(), blocks, out.data_ptr<float>(), stream);
  prep.write_back();
  return out;
}

void gsam_combine_accumulate_cuda(TensorRefs accum, TensorRefs grads, TensorRefs ascent, const at::Tensor& stats,
                                  double alpha, double eps, double scale, bool init) {
  if (accum.empty()) return;
  PreparedLists prep = prepare_lists("gsam_combine_accumulate_",
                                     {{"accum", accum, init ? Access::Write : Access::ReadWrite},
                                      {"grads", grads, Access::Read},
                                      {"ascent", ascent, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  const at::Tensor s = scalar_on("gsam_combine_accumulate_", "stats", stats, prep.device, 2);
  launch_gsam_combine_accumulate(dtype_of(prep.dtype), init, prep.flat, s.data_ptr<float>(),
                                 static_cast<float>(alpha), static_cast<float>(eps), static_cast<float>(scale),
                                 current_stream(prep.device));
  prep.write_back();
}

void restore_accumulate_cuda(TensorRefs params, TensorRefs backups, TensorRefs accum, TensorRefs grads, double scale,
                             bool init) {
  if (params.empty()) return;
  PreparedLists prep = prepare_lists("restore_accumulate_", {{"params", params, Access::Write},
                                                             {"backups", backups, Access::Read},
                                                             {"accum", accum, init ? Access::Write : Access::ReadWrite},
                                                             {"grads", grads, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  launch_restore_accumulate(dtype_of(prep.dtype), init, prep.flat, static_cast<float>(scale),
                            current_stream(prep.device));
  prep.write_back();
}

}  // namespace

const bool cuda_step_table_registered = register_step_op_table(
    c10::DeviceType::CUDA, {&sgd_step_cuda, &adam_step_cuda, &restore_gsam_reduce_cuda,
                            &gsam_combine_accumulate_cuda, &restore_accumulate_cuda});

}  // namespace cuda
}  // namespace fastsam

TORCH_LIBRARY_IMPL(fastsam, CUDA, m) {
  m.impl("sgd_step_", fastsam::boxed<&fastsam::cuda::sgd_step_cuda>());
  m.impl("adam_step_", fastsam::boxed<&fastsam::cuda::adam_step_cuda>());
  m.impl("restore_gsam_reduce", fastsam::boxed<&fastsam::cuda::restore_gsam_reduce_cuda>());
  m.impl("gsam_combine_accumulate_", fastsam::boxed<&fastsam::cuda::gsam_combine_accumulate_cuda>());
  m.impl("restore_accumulate_", fastsam::boxed<&fastsam::cuda::restore_accumulate_cuda>());
}
