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

#include "py_tensors.h"
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

// The variants' op table for the device of a call's first tensor list.
const VariantOpTable& table_of(const PyTensors& tensors, const char* op) {
  const VariantOpTable* table = variant_op_table(tensors.device_type());
  TORCH_CHECK(table != nullptr, "fastsam.", op, ": this build of fastsam._C has no kernels for ",
              tensors.device_type(), " tensors");
  return *table;
}

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
  PyTensors gv(gv_obj), grads(grads_obj), ascent(ascent_obj);
  const at::Tensor* stats = plain_tensor(stats_obj);
  if (!gv.plain() || !grads.plain() || !ascent.plain() || stats == nullptr || gv.empty()) Py_RETURN_NOTIMPLEMENTED;
  gv.check_writable("looksam_project_", "gv");
  const VariantOpTable& table = table_of(gv, "looksam_project_");
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
  PyTensors grads(grads_obj), gv(gv_obj);
  const at::Tensor* grad_sumsq = plain_tensor(grad_sumsq_obj);
  const at::Tensor* gv_sumsq = plain_tensor(gv_sumsq_obj);
  if (!grads.plain() || !gv.plain() || grad_sumsq == nullptr || gv_sumsq == nullptr || grads.empty()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  grads.check_writable("looksam_combine_", "grads");
  const VariantOpTable& table = table_of(grads, "looksam_combine_");
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
  PyTensors direction(direction_obj), ema(ema_obj), grads(grads_obj);
  if (!direction.plain() || !ema.plain() || !grads.plain() || direction.empty()) Py_RETURN_NOTIMPLEMENTED;
  direction.check_writable("friendly_direction_", "direction");
  ema.check_writable("friendly_direction_", "ema");
  const VariantOpTable& table = table_of(direction, "friendly_direction_");
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
