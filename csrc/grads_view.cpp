// fastsam._C.GradsOf (see grads_view.h) and the plan's parameter helpers:
//   _param_signature(params) -> bytes   what the step plan depends on, per parameter
//   GradRecord(params)                   which gradient tensors, at which versions
//   _clear_grads(params)                 `p.grad = None` for each (zero_grad(set_to_none=True))
//   _set_grads(params, tensors)          `p.grad = t` for each (loading accumulated gradients)
#include "grads_view.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace fastsam {
namespace {

struct GradsOfObject {
  PyObject_HEAD PyObject* params;  // a list (owned)
};

void grads_of_dealloc(PyObject* self) {
  Py_XDECREF(reinterpret_cast<GradsOfObject*>(self)->params);
  Py_TYPE(self)->tp_free(self);
}

int grads_of_init(PyObject* self, PyObject* args, PyObject* kwargs) {
  PyObject* params = nullptr;
  static const char* names[] = {"params", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!", const_cast<char**>(names), &PyList_Type, &params)) return -1;
  auto* obj = reinterpret_cast<GradsOfObject*>(self);
  Py_INCREF(params);
  Py_XSETREF(obj->params, params);
  return 0;
}

Py_ssize_t grads_of_len(PyObject* self) {
  return PyList_GET_SIZE(reinterpret_cast<GradsOfObject*>(self)->params);
}

// tensors() -> list: the current gradients (None where a parameter has none), for callers
// that need a real list (the dispatcher's path, tests).
PyObject* grads_of_tensors(PyObject* self, PyObject*) {
  PyObject* params = reinterpret_cast<GradsOfObject*>(self)->params;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  PyObject* out = PyList_New(n);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* grad = PyObject_GetAttrString(PyList_GET_ITEM(params, i), "grad");
    if (grad == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, i, grad);
  }
  return out;
}

PyObject* grads_of_params(PyObject* self, void*) {
  PyObject* params = reinterpret_cast<GradsOfObject*>(self)->params;
  Py_INCREF(params);
  return params;
}

PyMethodDef grads_of_methods[] = {
    {"tensors", grads_of_tensors, METH_NOARGS, "the parameters' current .grad (None where missing)"},
    {nullptr, nullptr, 0, nullptr}};
PyGetSetDef grads_of_getset[] = {{"params", grads_of_params, nullptr, "the parameters", nullptr},
                                 {nullptr, nullptr, nullptr, nullptr, nullptr}};
PySequenceMethods grads_of_sequence = {grads_of_len};

PyTypeObject GradsOfType = [] {
  PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
  t.tp_name = "fastsam._C.GradsOf";
  t.tp_basicsize = sizeof(GradsOfObject);
  t.tp_dealloc = grads_of_dealloc;
  t.tp_as_sequence = &grads_of_sequence;
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = "GradsOf(params: list): the .grad of each parameter, read in C++ by fastsam's ops at each call";
  t.tp_methods = grads_of_methods;
  t.tp_getset = grads_of_getset;
  t.tp_init = grads_of_init;
  t.tp_new = PyType_GenericNew;
  return t;
}();

[[noreturn]] void raise_missing_grad(Py_ssize_t index) {
  PyObject* module = PyImport_ImportModule("fastsam.ops");
  PyObject* type = module ? PyObject_GetAttrString(module, "MissingGrad") : nullptr;
  Py_XDECREF(module);
  if (type != nullptr) {
    PyErr_Format(type, "parameter %zd of the bucket has no gradient", index);
    Py_DECREF(type);
  }
  throw python_error();
}

const at::Tensor* unpack(PyObject* item, const char* what, Py_ssize_t i) {
  if (!THPVariable_Check(item)) {
    PyErr_Format(PyExc_TypeError, "fastsam.%s: item %zd is not a tensor", what, i);
    throw python_error();
  }
  return &THPVariable_Unpack(item);
}

// _param_signature(params) -> bytes: 16 bytes per parameter (numel; requires_grad, dtype,
// device type and index), so that the plan can tell with one comparison whether anything
// it depends on changed. (A gradient always matches its parameter's dtype, device and
// size: torch refuses any other.)
PyObject* param_signature(PyObject*, PyObject* params) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(params)) {
    PyErr_SetString(PyExc_TypeError, "fastsam._param_signature: expected a list of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  std::string out(static_cast<size_t>(n) * 16, '\0');
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& p = *unpack(PyList_GET_ITEM(params, i), "_param_signature", i);
    const int64_t numel = p.numel();
    const uint8_t flags[8] = {static_cast<uint8_t>(p.requires_grad()), static_cast<uint8_t>(p.scalar_type()),
                              static_cast<uint8_t>(p.device().type()), static_cast<uint8_t>(p.device().index() + 1),
                              0, 0, 0, 0};
    std::memcpy(&out[16 * i], &numel, 8);
    std::memcpy(&out[16 * i + 8], flags, 8);
  }
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
  END_HANDLE_TH_ERRORS
}

// GradRecord(params): which gradient tensor each parameter holds, at which version. The
// closure protocol (fastsam/closure.py) records one after a step and asks later whether
// the gradients are still those, unchanged. It holds weak references: they keep no
// gradient data alive, but do keep a freed tensor's address from being reused by a new
// gradient (which would then look unchanged; seen with set_to_none=True).
struct GradRecordObject {
  PyObject_HEAD std::vector<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>>* grads;
  std::vector<uint64_t>* versions;
};

void grad_record_dealloc(PyObject* self) {
  auto* obj = reinterpret_cast<GradRecordObject*>(self);
  delete obj->grads;
  delete obj->versions;
  Py_TYPE(self)->tp_free(self);
}

PyObject* grad_record_new(PyTypeObject* type, PyObject* args, PyObject*) {
  HANDLE_TH_ERRORS
  PyObject* params = nullptr;
  if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &params)) return nullptr;
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  auto* obj = reinterpret_cast<GradRecordObject*>(self);
  obj->grads = new std::vector<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>>();
  obj->versions = new std::vector<uint64_t>();
  const Py_ssize_t n = PyList_GET_SIZE(params);
  obj->grads->reserve(n);
  obj->versions->reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& g = unpack(PyList_GET_ITEM(params, i), "GradRecord", i)->grad();
    obj->grads->emplace_back(g.getIntrusivePtr());
    obj->versions->push_back(g.defined() ? g.unsafeGetTensorImpl()->version_counter().current_version() : 0);
  }
  return self;
  END_HANDLE_TH_ERRORS
}

// compare(params) -> (unchanged, present): how many parameters hold a gradient now, and how
// many of those hold the recorded tensor at the recorded version.
PyObject* grad_record_compare(PyObject* self, PyObject* params) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(params)) {
    PyErr_SetString(PyExc_TypeError, "GradRecord.compare: expected a list of tensors");
    return nullptr;
  }
  auto* obj = reinterpret_cast<GradRecordObject*>(self);
  const Py_ssize_t n = PyList_GET_SIZE(params);
  int64_t unchanged = 0, present = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& g = unpack(PyList_GET_ITEM(params, i), "GradRecord.compare", i)->grad();
    if (!g.defined()) continue;
    ++present;
    if (static_cast<size_t>(i) < obj->grads->size() &&
        (*obj->grads)[i]._unsafe_get_target() == g.unsafeGetTensorImpl() &&
        (*obj->versions)[i] == g.unsafeGetTensorImpl()->version_counter().current_version()) {
      ++unchanged;
    }
  }
  return Py_BuildValue("(LL)", static_cast<long long>(unchanged), static_cast<long long>(present));
  END_HANDLE_TH_ERRORS
}

PyMethodDef grad_record_methods[] = {
    {"compare", grad_record_compare, METH_O, "compare(params) -> (unchanged, present)"},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject GradRecordType = [] {
  PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
  t.tp_name = "fastsam._C.GradRecord";
  t.tp_basicsize = sizeof(GradRecordObject);
  t.tp_dealloc = grad_record_dealloc;
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = "GradRecord(params: list): which gradient tensors, at which versions (see closure.py)";
  t.tp_methods = grad_record_methods;
  t.tp_new = grad_record_new;
  return t;
}();

PyObject* clear_grads(PyObject*, PyObject* params) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(params)) {
    PyErr_SetString(PyExc_TypeError, "fastsam._clear_grads: expected a list of tensors");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
    const at::Tensor& p = *unpack(PyList_GET_ITEM(params, i), "_clear_grads", i);
    p.mutable_grad().reset();
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* set_grads(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params, *tensors;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &params, &PyList_Type, &tensors)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  TORCH_CHECK(PyList_GET_SIZE(tensors) == n, "fastsam._set_grads: ", n, " parameters but ",
              PyList_GET_SIZE(tensors), " gradients");
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& p = *unpack(PyList_GET_ITEM(params, i), "_set_grads", i);
    const at::Tensor& g = *unpack(PyList_GET_ITEM(tensors, i), "_set_grads", i);
    TORCH_CHECK(g.sizes() == p.sizes() && g.scalar_type() == p.scalar_type() && g.device() == p.device(),
                "fastsam._set_grads: gradient ", i, " does not match its parameter (size, dtype or device)");
    p.mutable_grad() = g;
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_param_signature", param_signature, METH_O, "_param_signature(params: list) -> bytes"},
    {"_clear_grads", clear_grads, METH_O, "_clear_grads(params: list): p.grad = None for each"},
    {"_set_grads", set_grads, METH_VARARGS, "_set_grads(params: list, tensors: list): p.grad = t for each"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

bool is_grads_view(PyObject* obj) {
  return Py_TYPE(obj) == &GradsOfType;
}

bool grads_of(PyObject* view, std::vector<at::Tensor>& out) {
  PyObject* params = reinterpret_cast<GradsOfObject*>(view)->params;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  out.clear();
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(params, i);
    if (!THPVariable_CheckExact(item)) {
      if (THPVariable_Check(item)) return false;  // a subclass: the dispatcher's path
      PyErr_Format(PyExc_TypeError, "fastsam.GradsOf: item %zd is not a tensor", i);
      throw python_error();
    }
    const at::Tensor& g = THPVariable_Unpack(item).grad();
    if (!g.defined()) raise_missing_grad(i);
    out.push_back(g);
  }
  return true;
}

int add_grads_view_type(PyObject* module) {
  for (auto [type, name] : {std::pair<PyTypeObject*, const char*>{&GradsOfType, "GradsOf"},
                            std::pair<PyTypeObject*, const char*>{&GradRecordType, "GradRecord"}}) {
    if (PyType_Ready(type) < 0) return -1;
    Py_INCREF(type);
    if (PyModule_AddObject(module, name, reinterpret_cast<PyObject*>(type)) < 0) {
      Py_DECREF(type);
      return -1;
    }
  }
  return 0;
}

PyMethodDef* grads_view_methods() {
  return methods;
}

}  // namespace fastsam
