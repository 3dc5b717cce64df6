// Eager entry points: fastsam._C.<op>(...), which fastsam/ops/compiled.py calls outside
// torch.compile. They run the same implementations as the registered torch.ops.fastsam
// ops (through the per-device tables of eager.h) but read the tensors straight out of the
// Python list items. torch.ops converts every Tensor[] argument into an IValue list first
// (a handle copy and reference count per tensor): 1.22 ms for two lists of 4096 tensors,
// against 0.014 ms to read them out of the Python objects (measured on this project's
// 2-core CPU), which was ~40% of a cpp SAM sub-step on the benchmark's 4096-tensor set.
//
// Only plain tensors and nn.Parameters take this path; anything else (tensor subclasses
// such as FakeTensor or DTensor) gets NotImplemented back and goes through torch.ops.
// Like torch's in-place ops, writes bump the written tensors' version counters, and
// tensors that require grad are not written while grad mode is on (the ops are not
// differentiable). The GIL is released while the kernels run; the list items are held.
#include <Python.h>

#include <ATen/core/grad_mode.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <vector>

#include "eager.h"
#include "grads_view.h"

namespace fastsam {

namespace {

std::array<OpTable, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>& tables() {
  static std::array<OpTable, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> t{};
  return t;
}

}  // namespace

bool register_op_table(c10::DeviceType device, const OpTable& table) {
  tables()[static_cast<size_t>(device)] = table;
  return true;
}

const OpTable* op_table(c10::DeviceType device) {
  const OpTable& table = tables()[static_cast<size_t>(device)];
  return table.sumsq != nullptr ? &table : nullptr;
}

namespace {

// The tensors of a Python list or tuple (None: no tensors), or the gradients of the
// parameters of a fastsam._C.GradsOf (grads_view.h), each held until the destructor,
// which runs with the GIL held (it is declared before the GIL release).
class PyTensors {
 public:
  explicit PyTensors(PyObject* sequence) {
    if (sequence == Py_None) return;
    if (is_grads_view(sequence)) {
      plain_ = grads_of(sequence, grads_);
      if (!plain_) return;
      pointers_.reserve(grads_.size());
      for (const at::Tensor& g : grads_) pointers_.push_back(&g);
      return;
    }
    PyObject* fast = PySequence_Fast(sequence, "fastsam: expected a list or tuple of tensors");
    if (fast == nullptr) throw python_error();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject** items = PySequence_Fast_ITEMS(fast);
    objects_.reserve(n);
    pointers_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_CheckExact(items[i])) {
        plain_ = false;
        break;
      }
      Py_INCREF(items[i]);
      objects_.push_back(items[i]);
      pointers_.push_back(&THPVariable_Unpack(items[i]));
    }
    Py_DECREF(fast);
  }
  PyTensors(const PyTensors&) = delete;
  PyTensors& operator=(const PyTensors&) = delete;
  ~PyTensors() {
    for (PyObject* o : objects_) Py_DECREF(o);
  }

  bool plain() const { return plain_; }
  bool empty() const { return pointers_.empty(); }
  TensorRefs refs() const { return TensorRefs(c10::ArrayRef<const at::Tensor*>(pointers_)); }

  // Before a write: refuse tensors autograd would have to track.
  void check_writable(const char* op, const char* name) const {
    if (!at::GradMode::is_enabled()) return;
    for (const at::Tensor* t : pointers_) {
      TORCH_CHECK(!t->requires_grad(), "fastsam.", op, ": ", name, " require grad and grad mode is on; "
                  "the ops are not differentiable: call them under torch.no_grad()");
    }
  }
  void bump_versions() const {
    for (const at::Tensor* t : pointers_) t->unsafeGetTensorImpl()->bump_version();
  }
  const OpTable& table(const char* op) const {
    const at::Tensor& first = *pointers_.front();
    const OpTable* table = op_table(first.device().type());
    TORCH_CHECK(table != nullptr, "fastsam.", op, ": this build of fastsam._C has no kernels for ",
                first.device().type(), " tensors");
    return *table;
  }

 private:
  std::vector<PyObject*> objects_;
  std::vector<at::Tensor> grads_;  // a GradsOf's gradients (strong references)
  std::vector<const at::Tensor*> pointers_;
  bool plain_ = true;
};

// A tensor argument (plain or a Parameter), or nullptr when it is anything else.
const at::Tensor* plain_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) ? &THPVariable_Unpack(obj) : nullptr;
}

PyObject* eager_sumsq(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *tensors_obj, *params_obj;
  long b;
  double eta;
  if (!PyArg_ParseTuple(args, "OOld", &tensors_obj, &params_obj, &b, &eta)) return nullptr;
  PyTensors tensors(tensors_obj), params(params_obj);
  if (!tensors.plain() || !params.plain() || tensors.empty()) Py_RETURN_NOTIMPLEMENTED;
  const OpTable& table = tensors.table("sumsq");
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = table.sumsq(tensors.refs(), params.refs(), b, eta);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* eager_perturb(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params_obj, *grads_obj, *backups_obj, *sumsq_obj, *ascent_obj, *ascent_sumsq_obj, *seed_obj;
  double rho, eta, eps;
  long a;
  if (!PyArg_ParseTuple(args, "OOOOdlddOOO", &params_obj, &grads_obj, &backups_obj, &sumsq_obj, &rho, &a, &eta,
                        &eps, &ascent_obj, &ascent_sumsq_obj, &seed_obj)) {
    return nullptr;
  }
  PyTensors params(params_obj), grads(grads_obj), backups(backups_obj), ascent(ascent_obj);
  const at::Tensor* sumsq = plain_tensor(sumsq_obj);
  const at::Tensor* ascent_sumsq = ascent_sumsq_obj == Py_None ? nullptr : plain_tensor(ascent_sumsq_obj);
  const at::Tensor* seed = seed_obj == Py_None ? nullptr : plain_tensor(seed_obj);
  if (!params.plain() || !grads.plain() || !backups.plain() || !ascent.plain() || sumsq == nullptr ||
      (ascent_sumsq_obj != Py_None && ascent_sumsq == nullptr) || (seed_obj != Py_None && seed == nullptr) ||
      params.empty()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  params.check_writable("perturb_", "params");
  backups.check_writable("perturb_", "backups");
  ascent.check_writable("perturb_", "ascent");
  const OpTable& table = params.table("perturb_");
  const std::optional<at::Tensor> ascent_scale =
      ascent_sumsq ? std::optional<at::Tensor>(*ascent_sumsq) : std::nullopt;
  const std::optional<at::Tensor> seed_tensor = seed ? std::optional<at::Tensor>(*seed) : std::nullopt;
  {
    pybind11::gil_scoped_release no_gil;
    table.perturb(params.refs(), grads.refs(), backups.refs(), *sumsq, rho, a, eta, eps, ascent.refs(),
                  ascent_scale, seed_tensor);
  }
  params.bump_versions();
  backups.bump_versions();
  ascent.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* eager_restore(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params_obj, *backups_obj;
  if (!PyArg_ParseTuple(args, "OO", &params_obj, &backups_obj)) return nullptr;
  PyTensors params(params_obj), backups(backups_obj);
  if (!params.plain() || !backups.plain() || params.empty()) Py_RETURN_NOTIMPLEMENTED;
  params.check_writable("restore_", "params");
  const OpTable& table = params.table("restore_");
  {
    pybind11::gil_scoped_release no_gil;
    table.restore(params.refs(), backups.refs());
  }
  params.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* eager_gsam_reduce(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *ascent_obj, *grads_obj;
  if (!PyArg_ParseTuple(args, "OO", &ascent_obj, &grads_obj)) return nullptr;
  PyTensors ascent(ascent_obj), grads(grads_obj);
  if (!ascent.plain() || !grads.plain() || grads.empty()) Py_RETURN_NOTIMPLEMENTED;
  const OpTable& table = grads.table("gsam_reduce");
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = table.gsam_reduce(ascent.refs(), grads.refs());
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* eager_gsam_combine(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *grads_obj, *ascent_obj, *stats_obj;
  double alpha, eps;
  if (!PyArg_ParseTuple(args, "OOOdd", &grads_obj, &ascent_obj, &stats_obj, &alpha, &eps)) return nullptr;
  PyTensors grads(grads_obj), ascent(ascent_obj);
  const at::Tensor* stats = plain_tensor(stats_obj);
  if (!grads.plain() || !ascent.plain() || stats == nullptr || grads.empty()) Py_RETURN_NOTIMPLEMENTED;
  grads.check_writable("gsam_combine_", "grads");
  const OpTable& table = grads.table("gsam_combine_");
  {
    pybind11::gil_scoped_release no_gil;
    table.gsam_combine(grads.refs(), ascent.refs(), *stats, alpha, eps);
  }
  grads.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* eager_accumulate(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *accum_obj, *grads_obj;
  double scale;
  int init;
  if (!PyArg_ParseTuple(args, "OOdp", &accum_obj, &grads_obj, &scale, &init)) return nullptr;
  PyTensors accum(accum_obj), grads(grads_obj);
  if (!accum.plain() || !grads.plain() || accum.empty()) Py_RETURN_NOTIMPLEMENTED;
  accum.check_writable("accumulate_", "accum");
  const OpTable& table = accum.table("accumulate_");
  {
    pybind11::gil_scoped_release no_gil;
    table.accumulate(accum.refs(), grads.refs(), scale, init != 0);
  }
  accum.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"sumsq", eager_sumsq, METH_VARARGS, "sumsq(tensors, params, b, eta) -> Tensor | NotImplemented"},
    {"perturb_", eager_perturb, METH_VARARGS,
     "perturb_(params, grads, backups, sumsq, rho, a, eta, eps, ascent, ascent_sumsq, seed) -> None | NotImplemented"},
    {"restore_", eager_restore, METH_VARARGS, "restore_(params, backups) -> None | NotImplemented"},
    {"gsam_reduce", eager_gsam_reduce, METH_VARARGS, "gsam_reduce(ascent, grads) -> Tensor | NotImplemented"},
    {"gsam_combine_", eager_gsam_combine, METH_VARARGS,
     "gsam_combine_(grads, ascent, stats, alpha, eps) -> None | NotImplemented"},
    {"accumulate_", eager_accumulate, METH_VARARGS, "accumulate_(accum, grads, scale, init) -> None | NotImplemented"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* eager_methods() {
  return methods;
}

}  // namespace fastsam
