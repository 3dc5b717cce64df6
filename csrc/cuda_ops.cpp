// The CUDA implementations of the fastsam ops, on the torch side: argument checks and
// layout staging (tensor_lists.h), device guard and current stream, buffers for the
// reductions, then the kernel launchers of cuda_kernels.cu (cuda_launch.h). Everything is
// queued on the current stream; nothing waits for the GPU.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_torch.h"
#include "boxed.h"
#include "cuda_launch.h"
#include "eager.h"
#include "tensor_lists.h"

namespace fastsam {
namespace cuda {
namespace {

at::Tensor floats(at::IntArrayRef shape, at::Device device) {
  return at::empty(shape, at::TensorOptions().dtype(at::kFloat).device(device));
}

at::Tensor sumsq_cuda(TensorRefs tensors, TensorRefs params, int64_t b, double eta) {
  check_exponent("sumsq", "b", b, 1);
  TORCH_CHECK(b == 0 || params.size() == tensors.size(),
              "fastsam.sumsq: b > 0 needs one parameter per tensor (T = |w| + eta)");
  TORCH_CHECK(!tensors.empty(), "fastsam.sumsq: empty list (the Python wrapper answers it)");
  PreparedLists prep = b == 0 ? prepare_lists("sumsq", {{"tensors", tensors, Access::Read}})
                              : prepare_lists("sumsq", {{"tensors", tensors, Access::Read},
                                                        {"params", params, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  const Stream stream = current_stream(prep.device);
  const int64_t blocks = planned_blocks(prep.flat.numels);
  at::Tensor partials = floats({blocks}, prep.device);
  at::Tensor out = floats({}, prep.device);
  launch_sumsq(dtype_of(prep.dtype), static_cast<int>(b), prep.flat, partials.data_ptr<float>(),
               static_cast<float>(eta), stream);
  launch_finish_sum(1, partials.data_ptr<float>(), blocks, out.data_ptr<float>(), stream);
  return out;
}

void perturb_cuda(TensorRefs params, TensorRefs grads, TensorRefs backups, const at::Tensor& sumsq,
                  double rho, int64_t a, double eta, double eps, TensorRefs ascent,
                  const std::optional<at::Tensor>& ascent_sumsq, const std::optional<at::Tensor>& seed) {
  check_exponent("perturb_", "a", a, 2);
  if (params.empty()) return;
  const bool with_ascent = !ascent.empty();
  PreparedLists prep = prepare_perturb_lists(params, grads, backups, ascent);
  const c10::cuda::CUDAGuard guard(prep.device);
  const at::Tensor s = scalar_on("perturb_", "sumsq", sumsq, prep.device, 1);
  const int mode = !with_ascent ? 0 : ascent_sumsq.has_value() ? 2 : 1;
  const at::Tensor as = mode == 2 ? scalar_on("perturb_", "ascent_sumsq", *ascent_sumsq, prep.device, 1) : s;
  const at::Tensor sd = seed.has_value() ? seed_on("perturb_", *seed, prep.device) : at::Tensor();
  launch_perturb(dtype_of(prep.dtype), static_cast<int>(a), mode, prep.flat, s.data_ptr<float>(),
                 as.data_ptr<float>(), sd.defined() ? sd.data_ptr<int64_t>() : nullptr, static_cast<float>(rho),
                 static_cast<float>(eta), static_cast<float>(eps), current_stream(prep.device));
  prep.write_back();
}

void restore_cuda(TensorRefs params, TensorRefs backups) {
  if (params.empty()) return;
  PreparedLists prep =
      prepare_lists("restore_", {{"params", params, Access::Write}, {"backups", backups, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  launch_restore(static_cast<int>(c10::elementSize(prep.dtype)), prep.flat, current_stream(prep.device));
  prep.write_back();
}

at::Tensor gsam_reduce_cuda(TensorRefs ascent, TensorRefs grads) {
  TORCH_CHECK(!grads.empty(), "fastsam.gsam_reduce: empty list (the Python wrapper answers it)");
  PreparedLists prep =
      prepare_lists("gsam_reduce", {{"ascent", ascent, Access::Read}, {"grads", grads, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  const Stream stream = current_stream(prep.device);
  const int64_t blocks = planned_blocks(prep.flat.numels);
  at::Tensor partials = floats({2 * blocks}, prep.device);
  at::Tensor out = floats({2}, prep.device);
  launch_gsam_reduce(dtype_of(prep.dtype), prep.flat, partials.data_ptr<float>(), stream);
  launch_finish_sum(2, partials.data_ptr<float>(), blocks, out.data_ptr<float>(), stream);
  return out;
}

void gsam_combine_cuda(TensorRefs grads, TensorRefs ascent, const at::Tensor& stats, double alpha,
                       double eps) {
  if (grads.empty()) return;
  PreparedLists prep =
      prepare_lists("gsam_combine_", {{"grads", grads, Access::ReadWrite}, {"ascent", ascent, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  const at::Tensor s = scalar_on("gsam_combine_", "stats", stats, prep.device, 2);
  launch_gsam_combine(dtype_of(prep.dtype), prep.flat, s.data_ptr<float>(), static_cast<float>(alpha),
                      static_cast<float>(eps), current_stream(prep.device));
  prep.write_back();
}

void accumulate_cuda(TensorRefs accum, TensorRefs grads, double scale, bool init) {
  if (accum.empty()) return;
  PreparedLists prep = prepare_lists(
      "accumulate_", {{"accum", accum, init ? Access::Write : Access::ReadWrite}, {"grads", grads, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  launch_accumulate(dtype_of(prep.dtype), init, prep.flat, static_cast<float>(scale), current_stream(prep.device));
  prep.write_back();
}

}  // namespace

const bool cuda_table_registered = register_op_table(
    c10::DeviceType::CUDA, {&sumsq_cuda, &perturb_cuda, &restore_cuda, &gsam_reduce_cuda, &gsam_combine_cuda,
                            &accumulate_cuda});

}  // namespace cuda
}  // namespace fastsam

TORCH_LIBRARY_IMPL(fastsam, CUDA, m) {
  m.impl("sumsq", fastsam::boxed<&fastsam::cuda::sumsq_cuda>());
  m.impl("perturb_", fastsam::boxed<&fastsam::cuda::perturb_cuda>());
  m.impl("restore_", fastsam::boxed<&fastsam::cuda::restore_cuda>());
  m.impl("gsam_reduce", fastsam::boxed<&fastsam::cuda::gsam_reduce_cuda>());
  m.impl("gsam_combine_", fastsam::boxed<&fastsam::cuda::gsam_combine_cuda>());
  m.impl("accumulate_", fastsam::boxed<&fastsam::cuda::accumulate_cuda>());
}
