// fastsam._C._list_signature(lists) -> (hash, bytes): the host-side cache key of the triton
// backend (fastsam/ops/triton_backend.py), computed in one pass in C++.
//
// The triton backend caches a launch (offsets table + plan) per set of tensors and must
// re-validate it on every call: same addresses, byte sizes, dtypes, devices and layouts.
// Reading those through Python attribute calls cost ~0.3 ms for the three lists of 161
// tensors of perturb_ on the ResNet-50 set (this project's 2-core CPU), more than the
// kernel itself takes on an H100-class GPU; here it is a few microseconds.
//
// The bytes hold, per list, its length, then per tensor: address, byte size, dtype,
// device type and index, and a contiguity flag; non-contiguous tensors add their sizes and
// strides. Two calls give equal bytes exactly when all of that is equal. The hash is of
// the bytes (64-bit multiply-xor over 8-byte words), so the cache can be a dict keyed by
// the hash and compare the bytes only on a hit.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace fastsam {

namespace {

void append(std::string& out, int64_t value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(value));
}

uint64_t hash_bytes(const std::string& bytes) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ bytes.size();
  const size_t words = bytes.size() / 8;
  for (size_t i = 0; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, bytes.data() + 8 * i, 8);
    h = (h ^ w) * 0xFF51AFD7ED558CCDULL;
    h ^= h >> 32;
  }
  for (size_t i = 8 * words; i < bytes.size(); ++i) {
    h = (h ^ static_cast<unsigned char>(bytes[i])) * 0xC4CEB9FE1A85EC53ULL;
  }
  return h ^ (h >> 29);
}

void append_tensor(std::string& out, const at::Tensor& t) {
  const bool contiguous = t.is_contiguous();
  append(out, reinterpret_cast<int64_t>(t.data_ptr()));
  append(out, static_cast<int64_t>(t.nbytes()));
  const int64_t tag = static_cast<int64_t>(t.scalar_type()) | (static_cast<int64_t>(t.device().type()) << 8) |
                      (static_cast<int64_t>(t.device().index() + 1) << 16) | (int64_t{contiguous} << 32);
  append(out, tag);
  if (!contiguous) {
    append(out, t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) {
      append(out, t.size(d));
      append(out, t.stride(d));
    }
  }
}

PyObject* list_signature(PyObject*, PyObject* lists) {
  HANDLE_TH_ERRORS
  PyObject* outer = PySequence_Fast(lists, "fastsam._C._list_signature: expected a sequence of tensor lists");
  if (outer == nullptr) return nullptr;
  std::string bytes;
  const Py_ssize_t n_lists = PySequence_Fast_GET_SIZE(outer);
  PyObject** list_items = PySequence_Fast_ITEMS(outer);
  for (Py_ssize_t l = 0; l < n_lists; ++l) {
    PyObject* fast = PySequence_Fast(list_items[l], "fastsam._C._list_signature: expected a list or tuple of tensors");
    if (fast == nullptr) {
      Py_DECREF(outer);
      return nullptr;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject** items = PySequence_Fast_ITEMS(fast);
    bytes.reserve(bytes.size() + 8 + static_cast<size_t>(n) * 24);
    append(bytes, n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) {
        Py_DECREF(fast);
        Py_DECREF(outer);
        PyErr_Format(PyExc_TypeError, "fastsam._C._list_signature: item %zd of list %zd is a %s, not a tensor", i, l,
                     Py_TYPE(items[i])->tp_name);
        return nullptr;
      }
      append_tensor(bytes, THPVariable_Unpack(items[i]));
    }
    Py_DECREF(fast);
  }
  Py_DECREF(outer);
  const uint64_t h = hash_bytes(bytes);
  return Py_BuildValue("(Ky#)", static_cast<unsigned long long>(h), bytes.data(),
                       static_cast<Py_ssize_t>(bytes.size()));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_list_signature", list_signature, METH_O,
     "_list_signature(lists) -> (hash, bytes): addresses, byte sizes, dtypes, devices and layouts of the "
     "tensors of each list (the triton backend's cache key)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* list_signature_methods() {
  return methods;
}

}  // namespace fastsam
