// Host code shared by the CPU and CUDA implementations of every op: argument checks and
// the handling of memory layouts.
//
// Kernels walk each tensor as a flat array. That is exact when every tensor that an op
// reads or writes at one list position shares one dense layout (contiguous, or e.g. all
// transposed the same way): element k of the flat walk is then the same logical element
// in each of them. Any other position (a strided view, mixed layouts) is *staged*: its
// tensors are replaced by contiguous stand-ins, and written ones are copied back after the
// kernel (on the same device stream; no host synchronisation). Correct for every view,
// fast for the layouts optimizers actually hold.
#pragma once

#include <ATen/core/ivalue.h>
#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <utility>
#include <vector>

#include "flat_lists.h"

namespace fastsam {

enum class Access { Read, Write, ReadWrite };

// A Tensor[] argument viewed where it lies: on the dispatcher's stack (see boxed.h), or as
// pointers to the tensors held by Python objects (the eager entry points, eager.cpp). No
// tensor handle is copied.
class TensorRefs {
 public:
  explicit TensorRefs(c10::ArrayRef<c10::IValue> items) : items_(items) {}
  explicit TensorRefs(c10::ArrayRef<const at::Tensor*> pointers) : pointers_(pointers), by_pointer_(true) {}
  size_t size() const { return by_pointer_ ? pointers_.size() : items_.size(); }
  bool empty() const { return size() == 0; }
  const at::Tensor& operator[](size_t i) const { return by_pointer_ ? *pointers_[i] : items_[i].toTensor(); }

 private:
  c10::ArrayRef<c10::IValue> items_;
  c10::ArrayRef<const at::Tensor*> pointers_;
  bool by_pointer_ = false;
};

struct ListArg {
  const char* name;
  TensorRefs tensors;
  Access access;
};

// The flat arrays an op's kernels walk, in list order: the caller's memory where the
// layout allows, staged stand-ins elsewhere. Only raw addresses are kept for the caller's
// tensors: copying thousands of tensor handles costs an atomic reference-count update
// each (and `perf` showed c10's decref_pyobject/GIL acquisition when they are released).
class PreparedLists {
 public:
  FlatLists flat;
  at::Device device{at::kCPU};
  at::ScalarType dtype = at::kFloat;

  size_t size() const { return flat.size(); }
  // Copy staged results into the caller's tensors (call after the kernels were queued).
  void write_back();

 private:
  friend PreparedLists prepare_lists(const char*, std::initializer_list<ListArg>);
  std::vector<std::pair<at::Tensor, at::Tensor>> write_backs_;  // (caller's tensor, stand-in)
  std::vector<at::Tensor> stand_ins_;                           // keeps read-only stand-ins alive
};

// Checks that the lists have equal lengths, that all tensors share one device and one
// floating dtype and that tensors at one position have equal shapes; written tensors must
// not overlap themselves. Empty lists are not passed here (the op has nothing to do).
PreparedLists prepare_lists(const char* op, std::initializer_list<ListArg> args);

// perturb_'s lists (params read and written, grads read, backups and the optional GSAM
// ascent copy written), shared by the CPU and CUDA implementations.
PreparedLists prepare_perturb_lists(TensorRefs params, TensorRefs grads, TensorRefs backups, TensorRefs ascent);

// A 0-d (or [n]) fp32 scalar tensor on `device`, from a data-dependent scalar argument.
at::Tensor scalar_on(const char* op, const char* name, const at::Tensor& t, at::Device device,
                     int64_t numel);

// The stochastic-rounding seed (an int64 0-d tensor) on `device`.
at::Tensor seed_on(const char* op, const at::Tensor& seed, at::Device device);

void check_exponent(const char* op, const char* name, int64_t value, int64_t max);

}  // namespace fastsam
