// Schemas and meta kernels of the efficient variants' ops (docs/ALGORITHMS.md §9), in the
// `fastsam` op namespace next to the core ops of ops.cpp. The semantics are the ops contract
// of fastsam/ops/__init__.py; variant_cpu.cpp and variant_cuda.cpp implement them.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "tensor_lists.h"

namespace fastsam {
namespace {

void looksam_project_meta(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, double, bool, double) {}

void looksam_combine_meta(at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&, double, double) {}

at::Tensor friendly_direction_meta(at::TensorList direction, at::TensorList, at::TensorList, double, double, bool) {
  auto options = at::TensorOptions().dtype(at::kFloat).device(
      direction.empty() ? at::Device(at::kMeta) : direction[0].device());
  return at::empty({}, options);
}

}  // namespace
}  // namespace fastsam

TORCH_LIBRARY_FRAGMENT(fastsam, m) {
  m.def("looksam_project_(Tensor(a!)[] gv, Tensor[] grads, Tensor[] ascent, Tensor stats, float weight, bool init, "
        "float eps) -> ()");
  m.def("looksam_combine_(Tensor(a!)[] grads, Tensor[] gv, Tensor grad_sumsq, Tensor gv_sumsq, float alpha, "
        "float eps) -> ()");
  m.def("friendly_direction_(Tensor(a!)[] direction, Tensor(b!)[] ema, Tensor[] grads, float sigma, float lam, "
        "bool init) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastsam, Meta, m) {
  m.impl("looksam_project_", &fastsam::looksam_project_meta);
  m.impl("looksam_combine_", &fastsam::looksam_combine_meta);
  m.impl("friendly_direction_", &fastsam::friendly_direction_meta);
}
