// The CUDA implementations of the efficient variants' ops on the torch side (as cuda_ops.cpp
// for the core ops): argument checks and layout staging, device guard and current stream,
// partial-sum buffers, then the launchers of variant_kernels.cu. Nothing waits for the GPU.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_torch.h"
#include "boxed.h"
#include "tensor_lists.h"
#include "variant_cuda_launch.h"
#include "variant_ops.h"

namespace fastsam {
namespace cuda {
namespace {

void looksam_project_cuda(TensorRefs gv, TensorRefs grads, TensorRefs ascent, const at::Tensor& stats, double weight,
                          bool init, double eps) {
  if (gv.empty()) return;
  PreparedLists prep = prepare_lists("looksam_project_", {{"gv", gv, init ? Access::Write : Access::ReadWrite},
                                                          {"grads", grads, Access::Read},
                                                          {"ascent", ascent, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  const at::Tensor s = scalar_on("looksam_project_", "stats", stats, prep.device, 2);
  launch_looksam_project(dtype_of(prep.dtype), init, prep.flat, s.data_ptr<float>(), static_cast<float>(weight),
                         static_cast<float>(eps), current_stream(prep.device));
  prep.write_back();
}

void looksam_combine_cuda(TensorRefs grads, TensorRefs gv, const at::Tensor& grad_sumsq, const at::Tensor& gv_sumsq,
                          double alpha, double eps) {
  if (grads.empty()) return;
  PreparedLists prep = prepare_lists("looksam_combine_", {{"grads", grads, Access::ReadWrite},
                                                          {"gv", gv, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  const at::Tensor gs = scalar_on("looksam_combine_", "grad_sumsq", grad_sumsq, prep.device, 1);
  const at::Tensor vs = scalar_on("looksam_combine_", "gv_sumsq", gv_sumsq, prep.device, 1);
  launch_looksam_combine(dtype_of(prep.dtype), prep.flat, gs.data_ptr<float>(), vs.data_ptr<float>(),
                         static_cast<float>(alpha), static_cast<float>(eps), current_stream(prep.device));
  prep.write_back();
}

at::Tensor friendly_direction_cuda(TensorRefs direction, TensorRefs ema, TensorRefs grads, double sigma, double lam,
                                   bool init) {
  TORCH_CHECK(!direction.empty(), "fastsam.friendly_direction_: empty list (the Python wrapper answers it)");
  PreparedLists prep = prepare_lists("friendly_direction_", {{"direction", direction, Access::Write},
                                                             {"ema", ema, init ? Access::Write : Access::ReadWrite},
                                                             {"grads", grads, Access::Read}});
  const c10::cuda::CUDAGuard guard(prep.device);
  const Stream stream = current_stream(prep.device);
  const int64_t blocks = planned_blocks(prep.flat.numels);
  const auto floats = at::TensorOptions().dtype(at::kFloat).device(prep.device);
  at::Tensor partials = at::empty({blocks}, floats);
  at::Tensor out = at::empty({}, floats);
  launch_friendly_direction(dtype_of(prep.dtype), init, prep.flat, partials.data_ptr<float>(),
                            static_cast<float>(sigma), static_cast<float>(lam), static_cast<float>(1.0 - lam), stream);
  launch_finish_sum(1, partials.data_ptr<float>(), blocks, out.data_ptr<float>(), stream);
  prep.write_back();
  return out;
}

}  // namespace

const bool cuda_variant_table_registered = register_variant_op_table(
    c10::DeviceType::CUDA, {&looksam_project_cuda, &looksam_combine_cuda, &friendly_direction_cuda});

}  // namespace cuda
}  // namespace fastsam

TORCH_LIBRARY_IMPL(fastsam, CUDA, m) {
  m.impl("looksam_project_", fastsam::boxed<&fastsam::cuda::looksam_project_cuda>());
  m.impl("looksam_combine_", fastsam::boxed<&fastsam::cuda::looksam_combine_cuda>());
  m.impl("friendly_direction_", fastsam::boxed<&fastsam::cuda::friendly_direction_cuda>());
}
