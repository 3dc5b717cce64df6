// Eager entry points of the efficient variants' ops (fastsam._C.looksam_project_, ...), the
// counterpart of eager.cpp for the core ops: the same implementations as the registered
// torch.ops.fastsam ops (through the per-device tables of variant_ops.h), with the tensors
// read straight from Python lists or a fastsam._C.GradsOf view, without torch.ops' list
// conversion (eager.cpp quotes the measurement). Plain tensors and Parameters only:
// anything else returns NotImplemented and goes through torch.ops. Written tensors get
// their version counters bumped; tensors that require grad are not written in grad mode.
#include <Python.h>

#include <ATen/core/grad_mode.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <vector>

#include "grads_view.h"
#include "variant_ops.h"

namespace fastsam {

namespace {

std::array<VariantOpTable, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>& tables() {
  static std::array<VariantOpTable, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> t{};
  return t;
}

}  // namespace

bool register_variant_op_table(c10::DeviceType device, const VariantOpTable& table) {
  tables()[static_cast<size_t>(device)] = table;
  return true;
}

const VariantOpTable* variant_op_table(c10::DeviceType device) {
  const VariantOpTable& table = tables()[static_cast<size_t>(device)];
  return table.looksam_project != nullptr ? &table : nullptr;
}

namespace {

// The tensors of a Python list or tuple, or the gradients of a GradsOf's parameters, each
// held until destruction (with the GIL held: declare it before releasing the GIL). Same
// rules as eager.cpp's list reader.
class TensorListArg {
 public:
  explicit TensorListArg(PyObject* sequence) {
    if (is_grads_view(sequence)) {
      plain_ = grads_of(sequence, grads_);
      if (!plain_) return;
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
  TensorListArg(const TensorListArg&) = delete;
  TensorListArg& operator=(const TensorListArg&) = delete;
  ~TensorListArg() {
    for (PyObject* o : objects_) Py_DECREF(o);
  }

  bool plain() const { return plain_; }
  bool empty() const { return pointers_.empty(); }
  TensorRefs refs() const { return TensorRefs(c10::ArrayRef<const at::Tensor*>(pointers_)); }
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
  const VariantOpTable& table(const char* op) const {
    const at::Tensor& first = *pointers_.front();
    const VariantOpTable* table = variant_op_table(first.device().type());
    TORCH_CHECK(table != nullptr, "fastsam.", op, ": this build of fastsam._C has no kernels for ",
                first.device().type(), " tensors");
    return *table;
  }

 private:
  std::vector<PyObject*> objects_;
  std::vector<at::Tensor> grads_;
  std::vector<const at::Tensor*> pointers_;
  bool plain_ = true;
};

const at::Tensor* plain_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) ? &THPVariable_Unpack(obj) : nullptr;
}

PyObject* eager_looksam_project(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *gv_obj, *grads_obj, *ascent_obj, *stats_obj;
  double weight, eps;
  int init;
  if (!PyArg_ParseTuple(args, "OOOOdpd", &gv_obj, &grads_obj, &ascent_obj, &stats_obj, &weight, &init, &eps)) {
    return nullptr;
  }
  TensorListArg gv(gv_obj), grads(grads_obj), ascent(ascent_obj);
  const at::Tensor* stats = plain_tensor(stats_obj);
  if (!gv.plain() || !grads.plain() || !ascent.plain() || stats == nullptr || gv.empty()) Py_RETURN_NOTIMPLEMENTED;
  gv.check_writable("looksam_project_", "gv");
  const VariantOpTable& table = gv.table("looksam_project_");
  {
    pybind11::gil_scoped_release no_gil;
    table.looksam_project(gv.refs(), grads.refs(), ascent.refs(), *stats, weight, init != 0, eps);
  }
  gv.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* eager_looksam_combine(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *grads_obj, *gv_obj, *grad_sumsq_obj, *gv_sumsq_obj;
  double alpha, eps;
  if (!PyArg_ParseTuple(args, "OOOOdd", &grads_obj, &gv_obj, &grad_sumsq_obj, &gv_sumsq_obj, &alpha, &eps)) {
    return nullptr;
  }
  TensorListArg grads(grads_obj), gv(gv_obj);
  const at::Tensor* grad_sumsq = plain_tensor(grad_sumsq_obj);
  const at::Tensor* gv_sumsq = plain_tensor(gv_sumsq_obj);
  if (!grads.plain() || !gv.plain() || grad_sumsq == nullptr || gv_sumsq == nullptr || grads.empty()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  grads.check_writable("looksam_combine_", "grads");
  const VariantOpTable& table = grads.table("looksam_combine_");
  {
    pybind11::gil_scoped_release no_gil;
    table.looksam_combine(grads.refs(), gv.refs(), *grad_sumsq, *gv_sumsq, alpha, eps);
  }
  grads.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* eager_friendly_direction(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *direction_obj, *ema_obj, *grads_obj;
  double sigma, lam;
  int init;
  if (!PyArg_ParseTuple(args, "OOOddp", &direction_obj, &ema_obj, &grads_obj, &sigma, &lam, &init)) return nullptr;
  TensorListArg direction(direction_obj), ema(ema_obj), grads(grads_obj);
  if (!direction.plain() || !ema.plain() || !grads.plain() || direction.empty()) Py_RETURN_NOTIMPLEMENTED;
  direction.check_writable("friendly_direction_", "direction");
  ema.check_writable("friendly_direction_", "ema");
  const VariantOpTable& table = direction.table("friendly_direction_");
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = table.friendly_direction(direction.refs(), ema.refs(), grads.refs(), sigma, lam, init != 0);
  }
  direction.bump_versions();
  ema.bump_versions();
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"looksam_project_", eager_looksam_project, METH_VARARGS,
     "looksam_project_(gv, grads, ascent, stats, weight, init, eps) -> None | NotImplemented"},
    {"looksam_combine_", eager_looksam_combine, METH_VARARGS,
     "looksam_combine_(grads, gv, grad_sumsq, gv_sumsq, alpha, eps) -> None | NotImplemented"},
    {"friendly_direction_", eager_friendly_direction, METH_VARARGS,
     "friendly_direction_(direction, ema, grads, sigma, lam, init) -> Tensor | NotImplemented"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* variant_eager_methods() {
  return methods;
}

}  // namespace fastsam
