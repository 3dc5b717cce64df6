// fastsam._C.GradsOf and the parameter helpers of the step plan (fastsam/plan.py).
//
// A GradsOf wraps a Python list of parameters; wherever an eager entry point (eager.cpp)
// takes a list of gradients, it also takes a GradsOf and reads each parameter's `.grad`
// in C++ at that call. The optimizer then keeps one object per bucket instead of building
// a list of gradients in Python for every op (about 60 ns per tensor, i.e. 0.25 ms for
// 4096 tensors, measured on this project's CPU).
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>

#include <vector>

namespace fastsam {

bool is_grads_view(PyObject* obj);

// The gradients of the parameters a GradsOf holds (strong references), or a Python error
// (fastsam.ops.MissingGrad when a parameter has none; TypeError for a non-tensor item).
// Returns false (no error set) when an item is a tensor subclass: the caller then takes
// the dispatcher's path, which reads the gradients in Python.
bool grads_of(PyObject* view, std::vector<at::Tensor>& out);

int add_grads_view_type(PyObject* module);
PyMethodDef* grads_view_methods();

}  // namespace fastsam
