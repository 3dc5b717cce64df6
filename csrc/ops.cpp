// fastsam._C: the op schemas (declared once, namespace `fastsam`), their meta/fake
// kernels, host-only debug ops exposing the launch planners, and the Python module entry.
// The CPU kernels (cpu_kernels.cpp) and the CUDA ones (cuda_ops.cpp, launching
// cuda_kernels.cu) register themselves for their dispatch keys. The semantics are the
// ops contract of fastsam/ops/__init__.py; csrc/README.md maps the files.
#include <Python.h>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "plan.h"
#ifdef FASTSAM_WITH_CUDA
#include "cuda_launch.h"
#endif

namespace fastsam {

int64_t cpu_threads_used(int64_t items);  // cpu_kernels.cpp
PyMethodDef* eager_methods();            // eager.cpp
PyMethodDef* list_signature_methods();   // list_signature.cpp
PyMethodDef* grads_view_methods();       // grads_view.cpp
int add_grads_view_type(PyObject* m);    // grads_view.cpp
PyMethodDef* base_step_methods();        // base_step_eager.cpp
PyMethodDef* variant_eager_methods();    // variant_eager.cpp

namespace {

// ---- meta kernels: shapes and dtypes only (used by FakeTensor / torch.compile) ----

at::Tensor sumsq_meta(at::TensorList tensors, at::TensorList, int64_t, double) {
  auto options = at::TensorOptions().dtype(at::kFloat).device(
      tensors.empty() ? at::Device(at::kMeta) : tensors[0].device());
  return at::empty({}, options);
}

void perturb_meta(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, double, int64_t,
                  double, double, at::TensorList, const std::optional<at::Tensor>&,
                  const std::optional<at::Tensor>&) {}

void restore_meta(at::TensorList, at::TensorList) {}

at::Tensor gsam_reduce_meta(at::TensorList ascent, at::TensorList grads) {
  auto options = at::TensorOptions().dtype(at::kFloat).device(
      grads.empty() ? at::Device(at::kMeta) : grads[0].device());
  return at::empty({2}, options);
}

void gsam_combine_meta(at::TensorList, at::TensorList, const at::Tensor&, double, double) {}

void accumulate_meta(at::TensorList, at::TensorList, double, bool) {}

// ---- debug ops: the planners, for exhaustive coverage tests on the CPU ----

// int64 [segments, 4]: (item, tensor, begin, end) in execution order.
at::Tensor plan_cpu_items(c10::IntArrayRef numels, int64_t item_size) {
  TORCH_CHECK(item_size > 0, "_plan_cpu_items: item_size must be positive");
  CpuItems items(std::vector<int64_t>(numels.begin(), numels.end()), item_size);
  std::vector<int64_t> rows;
  for (int64_t k = 0; k < items.count; ++k) {
    items.for_each_segment(k, [&](int64_t t, int64_t lo, int64_t hi) {
      rows.insert(rows.end(), {k, t, lo, hi});
    });
  }
  at::Tensor out = at::empty({static_cast<int64_t>(rows.size() / 4), 4}, at::kLong);
  std::copy(rows.begin(), rows.end(), out.data_ptr<int64_t>());
  return out;
}

// int64 [blocks, 5]: (launch, global block index = partials slot, slot, tensor, chunk).
at::Tensor plan_cuda_launches(c10::IntArrayRef numels, int64_t chunk_size, int64_t max_tensors,
                              int64_t max_blocks) {
  auto launches = plan_launches(std::vector<int64_t>(numels.begin(), numels.end()), chunk_size,
                                max_tensors, max_blocks);
  std::vector<int64_t> rows;
  for (size_t l = 0; l < launches.size(); ++l) {
    const auto& launch = launches[l];
    const int slots = static_cast<int>(launch.tensors.size());
    for (int32_t b = 0; b < launch.blocks; ++b) {  // each block's lookup, as the kernel does it
      const int s = slot_of_block(launch.slot_first_block.data(), slots, b);
      rows.insert(rows.end(), {static_cast<int64_t>(l), launch.first_block + b, static_cast<int64_t>(s),
                               launch.tensors[s], launch.slot_first_chunk[s] + (b - launch.slot_first_block[s])});
    }
  }
  at::Tensor out = at::empty({static_cast<int64_t>(rows.size() / 5), 5}, at::kLong);
  std::copy(rows.begin(), rows.end(), out.data_ptr<int64_t>());
  return out;
}

// [cpu_item_size, cuda_chunk_size, cuda_block_threads, cuda_max_blocks,
//  cuda_max_tensors(depth 1..4)..., cuda_max_tensors_large(depth 1..4)..., large arguments in use (0/1)]
std::vector<int64_t> launch_config() {
  std::vector<int64_t> out{kCpuItemSize, cuda_chunk_size(), kCudaBlockThreads, kCudaMaxBlocks};
  for (int depth = 1; depth <= kCudaMaxDepth; ++depth) out.push_back(cuda_max_tensors(depth));
  for (int depth = 1; depth <= kCudaMaxDepth; ++depth) out.push_back(cuda_max_tensors_large(depth));
#ifdef FASTSAM_WITH_CUDA
  out.push_back(cuda::large_params_built() && cuda_large_params_requested());
#else
  out.push_back(0);
#endif
  return out;
}

}  // namespace
}  // namespace fastsam

TORCH_LIBRARY(fastsam, m) {
  // Empty `params` (sumsq with b == 0) and empty `ascent` (perturb without GSAM) mean
  // "not given"; the Python wrappers in fastsam/ops/compiled.py pass [] for None.
  m.def("sumsq(Tensor[] tensors, Tensor[] params, int b, float eta) -> Tensor");
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor sumsq, float rho, "
        "int a, float eta, float eps, Tensor(c!)[] ascent, Tensor? ascent_sumsq, Tensor? seed=None) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  m.def("gsam_reduce(Tensor[] ascent, Tensor[] grads) -> Tensor");
  m.def("gsam_combine_(Tensor(a!)[] grads, Tensor[] ascent, Tensor stats, float alpha, float eps) -> ()");
  m.def("accumulate_(Tensor(a!)[] accum, Tensor[] grads, float scale, bool init) -> ()");
  // Host-only debug ops (no tensor inputs; not part of the ops contract, not for torch.compile).
  m.def("_plan_cpu_items(int[] numels, int item_size) -> Tensor", &fastsam::plan_cpu_items);
  m.def("_plan_cuda_launches(int[] numels, int chunk_size, int max_tensors, int max_blocks) -> Tensor",
        &fastsam::plan_cuda_launches);
  m.def("_launch_config() -> int[]", &fastsam::launch_config);
  m.def("_cpu_threads_used(int items) -> int", &fastsam::cpu_threads_used);
}

TORCH_LIBRARY_IMPL(fastsam, Meta, m) {
  m.impl("sumsq", &fastsam::sumsq_meta);
  m.impl("perturb_", &fastsam::perturb_meta);
  m.impl("restore_", &fastsam::restore_meta);
  m.impl("gsam_reduce", &fastsam::gsam_reduce_meta);
  m.impl("gsam_combine_", &fastsam::gsam_combine_meta);
  m.impl("accumulate_", &fastsam::accumulate_meta);
}

// ---- Python module: importing fastsam._C loads the library, which registers the ops ----

#ifdef FASTSAM_WITH_CUDA
#define FASTSAM_CUDA_FLAG 1
#else
#define FASTSAM_CUDA_FLAG 0
#endif

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastsam._C",
                               "fastsam's compiled kernels: the ops are in torch.ops.fastsam; the functions here are "
                               "their eager entry points (csrc/eager.cpp)", -1,
                               nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddFunctions(m, fastsam::eager_methods()) != 0 ||
      PyModule_AddFunctions(m, fastsam::list_signature_methods()) != 0 ||
      PyModule_AddFunctions(m, fastsam::grads_view_methods()) != 0 || fastsam::add_grads_view_type(m) != 0 ||
      PyModule_AddFunctions(m, fastsam::base_step_methods()) != 0 ||
      PyModule_AddFunctions(m, fastsam::variant_eager_methods()) != 0 ||
      PyModule_AddIntConstant(m, "WITH_CUDA", FASTSAM_CUDA_FLAG) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
