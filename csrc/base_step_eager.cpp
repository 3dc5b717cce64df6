// Eager entry points of the fused base steps and the unperturb chain: fastsam._C.<op>(...),
// called by fastsam/ops/compiled.py outside torch.compile, as eager.cpp does for the other
// ops (same implementations as the registered torch.ops.fastsam ops, through the
// per-device tables of base_step.h; NotImplemented for tensor subclasses; written tensors
// get their version counters bumped; the GIL is released while the kernels run).
#include <Python.h>

#include <pybind11/pybind11.h>

#include "base_step.h"
#include "py_tensors.h"

namespace fastsam {

namespace {

const StepOpTable& table_for(const PyTensors& lead, const char* op) {
  const StepOpTable* table = step_op_table(lead.device_type());
  TORCH_CHECK(table != nullptr, "fastsam.", op, ": this build of fastsam._C has no kernels for ", lead.device_type(),
              " tensors");
  return *table;
}

PyObject* eager_sgd_step(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params_obj, *grads_obj, *buffers_obj, *backups_obj, *lr_tensor_obj, *grad_scale_obj, *found_inf_obj,
      *ascent_obj, *stats_obj, *accum_obj;
  double lr, weight_decay, momentum, dampening, alpha, gsam_eps, accum_scale;
  int nesterov, maximize, first;
  if (!PyArg_ParseTuple(args, "OOOOdOdddpppOOOOddOd", &params_obj, &grads_obj, &buffers_obj, &backups_obj, &lr,
                        &lr_tensor_obj, &weight_decay, &momentum, &dampening, &nesterov, &maximize, &first,
                        &grad_scale_obj, &found_inf_obj, &ascent_obj, &stats_obj, &alpha, &gsam_eps, &accum_obj,
                        &accum_scale)) {
    return nullptr;
  }
  PyTensors params(params_obj), grads(grads_obj), buffers(buffers_obj), backups(backups_obj), ascent(ascent_obj),
      accum(accum_obj);
  PyOptionalTensor lr_tensor(lr_tensor_obj), grad_scale(grad_scale_obj), found_inf(found_inf_obj),
      stats(stats_obj);
  if (!params.plain() || !grads.plain() || !buffers.plain() || !backups.plain() || !ascent.plain() ||
      !accum.plain() || !lr_tensor.plain() || !grad_scale.plain() || !found_inf.plain() || !stats.plain() ||
      params.empty()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  params.check_writable("sgd_step_", "params");
  buffers.check_writable("sgd_step_", "momentum_buffers");
  const StepOpTable& table = table_for(params, "sgd_step_");
  {
    pybind11::gil_scoped_release no_gil;
    table.sgd_step(params.refs(), grads.refs(), buffers.refs(), backups.refs(), lr, lr_tensor.value(), weight_decay,
                   momentum, dampening, nesterov != 0, maximize != 0, first != 0, grad_scale.value(),
                   found_inf.value(), ascent.refs(), stats.value(), alpha, gsam_eps, accum.refs(), accum_scale);
  }
  params.bump_versions();
  buffers.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* eager_adam_step(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params_obj, *grads_obj, *m_obj, *v_obj, *vmax_obj, *steps_obj, *backups_obj, *lr_tensor_obj,
      *grad_scale_obj, *found_inf_obj, *ascent_obj, *stats_obj, *accum_obj;
  double lr, beta1, beta2, eps, weight_decay, alpha, gsam_eps, accum_scale;
  int amsgrad, maximize, decoupled;
  if (!PyArg_ParseTuple(args, "OOOOOOOdOddddpppOOOOddOd", &params_obj, &grads_obj, &m_obj, &v_obj, &vmax_obj,
                        &steps_obj, &backups_obj, &lr, &lr_tensor_obj, &beta1, &beta2, &eps, &weight_decay,
                        &amsgrad, &maximize, &decoupled, &grad_scale_obj, &found_inf_obj, &ascent_obj, &stats_obj,
                        &alpha, &gsam_eps, &accum_obj, &accum_scale)) {
    return nullptr;
  }
  PyTensors params(params_obj), grads(grads_obj), m(m_obj), v(v_obj), vmax(vmax_obj), steps(steps_obj),
      backups(backups_obj), ascent(ascent_obj), accum(accum_obj);
  PyOptionalTensor lr_tensor(lr_tensor_obj), grad_scale(grad_scale_obj), found_inf(found_inf_obj),
      stats(stats_obj);
  if (!params.plain() || !grads.plain() || !m.plain() || !v.plain() || !vmax.plain() || !steps.plain() ||
      !backups.plain() || !ascent.plain() || !accum.plain() || !lr_tensor.plain() || !grad_scale.plain() ||
      !found_inf.plain() || !stats.plain() || params.empty()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  params.check_writable("adam_step_", "params");
  m.check_writable("adam_step_", "exp_avgs");
  v.check_writable("adam_step_", "exp_avg_sqs");
  vmax.check_writable("adam_step_", "max_exp_avg_sqs");
  steps.check_writable("adam_step_", "steps");
  const StepOpTable& table = table_for(params, "adam_step_");
  {
    pybind11::gil_scoped_release no_gil;
    table.adam_step(params.refs(), grads.refs(), m.refs(), v.refs(), vmax.refs(), steps.refs(), backups.refs(), lr,
                    lr_tensor.value(), beta1, beta2, eps, weight_decay, amsgrad != 0, maximize != 0, decoupled != 0,
                    grad_scale.value(), found_inf.value(), ascent.refs(), stats.value(), alpha, gsam_eps,
                    accum.refs(), accum_scale);
  }
  params.bump_versions();
  m.bump_versions();
  v.bump_versions();
  vmax.bump_versions();
  steps.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* eager_restore_gsam_reduce(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params_obj, *backups_obj, *ascent_obj, *grads_obj;
  if (!PyArg_ParseTuple(args, "OOOO", &params_obj, &backups_obj, &ascent_obj, &grads_obj)) return nullptr;
  PyTensors params(params_obj), backups(backups_obj), ascent(ascent_obj), grads(grads_obj);
  if (!params.plain() || !backups.plain() || !ascent.plain() || !grads.plain() || grads.empty()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  params.check_writable("restore_gsam_reduce", "params");
  const StepOpTable& table = table_for(grads, "restore_gsam_reduce");
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = table.restore_gsam_reduce(params.refs(), backups.refs(), ascent.refs(), grads.refs());
  }
  params.bump_versions();
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* eager_gsam_combine_accumulate(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *accum_obj, *grads_obj, *ascent_obj, *stats_obj;
  double alpha, eps, scale;
  int init;
  if (!PyArg_ParseTuple(args, "OOOOdddp", &accum_obj, &grads_obj, &ascent_obj, &stats_obj, &alpha, &eps, &scale,
                        &init)) {
    return nullptr;
  }
  PyTensors accum(accum_obj), grads(grads_obj), ascent(ascent_obj);
  PyOptionalTensor stats(stats_obj);
  if (!accum.plain() || !grads.plain() || !ascent.plain() || !stats.plain() || !stats.value().has_value() ||
      accum.empty()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  accum.check_writable("gsam_combine_accumulate_", "accum");
  const StepOpTable& table = table_for(accum, "gsam_combine_accumulate_");
  {
    pybind11::gil_scoped_release no_gil;
    table.gsam_combine_accumulate(accum.refs(), grads.refs(), ascent.refs(), *stats.value(), alpha, eps, scale,
                                  init != 0);
  }
  accum.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* eager_restore_accumulate(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params_obj, *backups_obj, *accum_obj, *grads_obj;
  double scale;
  int init;
  if (!PyArg_ParseTuple(args, "OOOOdp", &params_obj, &backups_obj, &accum_obj, &grads_obj, &scale, &init)) {
    return nullptr;
  }
  PyTensors params(params_obj), backups(backups_obj), accum(accum_obj), grads(grads_obj);
  if (!params.plain() || !backups.plain() || !accum.plain() || !grads.plain() || params.empty()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  params.check_writable("restore_accumulate_", "params");
  accum.check_writable("restore_accumulate_", "accum");
  const StepOpTable& table = table_for(params, "restore_accumulate_");
  {
    pybind11::gil_scoped_release no_gil;
    table.restore_accumulate(params.refs(), backups.refs(), accum.refs(), grads.refs(), scale, init != 0);
  }
  params.bump_versions();
  accum.bump_versions();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"sgd_step_", eager_sgd_step, METH_VARARGS,
     "sgd_step_(params, grads, momentum_buffers, backups, lr, lr_tensor, weight_decay, momentum, dampening, "
     "nesterov, maximize, first, grad_scale, found_inf, ascent, gsam_stats, alpha, gsam_eps, accum, accum_scale) "
     "-> None | NotImplemented"},
    {"adam_step_", eager_adam_step, METH_VARARGS,
     "adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, backups, lr, lr_tensor, beta1, "
     "beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf, ascent, "
     "gsam_stats, alpha, gsam_eps, accum, accum_scale) -> None | NotImplemented"},
    {"restore_gsam_reduce", eager_restore_gsam_reduce, METH_VARARGS,
     "restore_gsam_reduce(params, backups, ascent, grads) -> Tensor | NotImplemented"},
    {"gsam_combine_accumulate_", eager_gsam_combine_accumulate, METH_VARARGS,
     "gsam_combine_accumulate_(accum, grads, ascent, stats, alpha, eps, scale, init) -> None | NotImplemented"},
    {"restore_accumulate_", eager_restore_accumulate, METH_VARARGS,
     "restore_accumulate_(params, backups, accum, grads, scale, init) -> None | NotImplemented"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* base_step_methods() {
  return methods;
}

}  // namespace fastsam
