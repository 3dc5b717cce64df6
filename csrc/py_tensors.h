// Tensor lists and tensors read straight out of Python objects, for the eager entry points
// (eager.cpp, base_step_eager.cpp) that skip torch.ops' conversion of every Tensor[]
// argument (see eager.cpp for the measurement). PyTensors holds a reference to each item until it is destroyed, which must
// happen with the GIL held (declare it before releasing the GIL). Only plain tensors and
// nn.Parameters qualify; for anything else (FakeTensor, DTensor, ...) plain() is false and
// the entry point returns NotImplemented, so that the call goes through torch.ops.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "grads_view.h"
#include "tensor_lists.h"

namespace fastsam {

class PyTensors {
 public:
  // A list or tuple of tensors, or the gradients of the parameters of a fastsam._C.GradsOf
  // (grads_view.h); None: no tensors.
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
  c10::DeviceType device_type() const { return pointers_.front()->device().type(); }

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

 private:
  std::vector<PyObject*> objects_;
  std::vector<at::Tensor> grads_;  // a GradsOf's gradients (strong references)
  std::vector<const at::Tensor*> pointers_;
  bool plain_ = true;
};

// An optional tensor argument: None, a plain tensor (or Parameter), or anything else.
class PyOptionalTensor {
 public:
  explicit PyOptionalTensor(PyObject* obj) {
    if (obj == Py_None) return;
    if (!THPVariable_CheckExact(obj)) {
      plain_ = false;
      return;
    }
    value_ = THPVariable_Unpack(obj);
  }
  bool plain() const { return plain_; }
  const std::optional<at::Tensor>& value() const { return value_; }

 private:
  std::optional<at::Tensor> value_;
  bool plain_ = true;
};

}  // namespace fastsam
