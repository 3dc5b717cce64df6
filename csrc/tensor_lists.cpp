// Argument checks and layout staging shared by the CPU and CUDA ops (see tensor_lists.h).
#include "tensor_lists.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace fastsam {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// True when the flat walk over every tensor of a position visits the same logical elements.
bool shares_dense_layout(const std::vector<const at::Tensor*>& ts) {
  const at::Tensor& first = *ts.front();
  if (first.numel() <= 1) return true;
  for (const at::Tensor* t : ts) {
    if (!t->is_non_overlapping_and_dense()) return false;
    if (t->strides() != first.strides()) return false;
  }
  return true;
}

// Tensor metadata (TensorImpl, then its StorageImpl) is scattered over the heap and cold
// by the time an op runs; the first load from each TensorImpl was 55% of this file's
// samples in `perf` (4096-tensor set, 3 lists). Prefetching a few positions ahead overlaps
// those misses: TensorImpl lines first, the StorageImpl once its pointer is cached.
constexpr size_t kPrefetchImpl = 8;
constexpr size_t kPrefetchStorage = 4;

inline void prefetch_impl(const at::Tensor& t) {
  const char* impl = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
  for (int line = 0; line < 4; ++line) __builtin_prefetch(impl + 64 * line);
}

inline void prefetch_storage(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->has_storage()) __builtin_prefetch(impl->unsafe_storage().unsafeGetStorageImpl());
}

}  // namespace

void PreparedLists::write_back() {
  for (auto& [target, stand_in] : write_backs_) target.copy_(stand_in);
  write_backs_.clear();
}

PreparedLists prepare_lists(const char* op, std::initializer_list<ListArg> args) {
  PreparedLists out;
  TORCH_CHECK(args.size() > 0, op, ": no tensor lists");
  const ListArg& lead = *args.begin();
  const size_t n = lead.tensors.size();
  TORCH_CHECK(n > 0, op, ": empty tensor lists reach no kernel (the Python wrapper returns early)");
  for (const ListArg& a : args) {
    TORCH_CHECK(a.tensors.size() == n, "fastsam.", op, ": ", a.name, " has ", a.tensors.size(),
                " tensors but ", lead.name, " has ", n, "; the lists must match one to one");
  }
  const at::Tensor& first = lead.tensors[0];
  out.device = first.device();
  out.dtype = first.scalar_type();
  TORCH_CHECK(supported_dtype(out.dtype), "fastsam.", op, ": unsupported dtype ", out.dtype,
              "; the compiled kernels compute in fp32 and take float32, bfloat16 and float16 (use backend "
              "'foreach' or 'auto' for float64)");

  TORCH_CHECK(args.size() <= static_cast<size_t>(kMaxLists), op, ": too many tensor lists");
  out.flat.depth = static_cast<int>(args.size());
  for (int l = 0; l < out.flat.depth; ++l) out.flat.addresses[l].reserve(n);
  out.flat.numels.reserve(n);
  std::vector<Access> access;
  for (const ListArg& a : args) access.push_back(a.access);
  // Reads take the const pointer, writes the mutable one (which materialises a
  // copy-on-write storage before the kernel writes through it).
  auto address = [](const at::Tensor& t, Access how) -> void* {
    return how == Access::Read ? const_cast<void*>(t.const_data_ptr()) : t.mutable_data_ptr();
  };
  std::vector<const at::Tensor*> at_position(args.size());
  for (size_t i = 0; i < n; ++i) {
    for (const ListArg& a : args) {
      if (i + kPrefetchImpl < n && a.tensors[i + kPrefetchImpl].defined()) prefetch_impl(a.tensors[i + kPrefetchImpl]);
      if (i + kPrefetchStorage < n && a.tensors[i + kPrefetchStorage].defined()) {
        prefetch_storage(a.tensors[i + kPrefetchStorage]);
      }
    }
    size_t l = 0;
    for (const ListArg& a : args) {
      const at::Tensor& t = a.tensors[i];
      TORCH_CHECK(t.defined(), "fastsam.", op, ": ", a.name, "[", i, "] is undefined");
      TORCH_CHECK(t.device() == out.device, "fastsam.", op, ": ", a.name, "[", i, "] is on ",
                  t.device(), " but ", lead.name, "[0] is on ", out.device,
                  "; all tensors of one call must share a device");
      TORCH_CHECK(t.scalar_type() == out.dtype, "fastsam.", op, ": ", a.name, "[", i, "] is ",
                  t.scalar_type(), " but ", lead.name, "[0] is ", out.dtype,
                  "; all tensors of one call must share a dtype (group them by dtype)");
      TORCH_CHECK(t.sizes() == lead.tensors[i].sizes(), "fastsam.", op, ": ", a.name, "[", i,
                  "] has shape ", t.sizes(), " but ", lead.name, "[", i, "] has shape ",
                  lead.tensors[i].sizes());
      if (a.access != Access::Read) {
        TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "fastsam.", op, ": ",
                    a.name, "[", i, "] is written but has overlapping elements (e.g. expand()); "
                    "pass a tensor that owns its elements");
      }
      at_position[l++] = &t;
    }
    const int64_t numel = lead.tensors[i].numel();
    out.flat.numels.push_back(numel);
    if (numel == 0) {  // never dereferenced
      for (int d = 0; d < out.flat.depth; ++d) out.flat.addresses[d].push_back(nullptr);
      continue;
    }
    if (shares_dense_layout(at_position)) {
      for (int d = 0; d < out.flat.depth; ++d) out.flat.addresses[d].push_back(address(*at_position[d], access[d]));
      continue;
    }
    l = 0;
    for (const ListArg& a : args) {
      const at::Tensor& t = a.tensors[i];
      at::Tensor flat;
      if (t.is_contiguous()) {
        flat = t;
      } else if (a.access == Access::Write) {
        flat = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
        out.write_backs_.emplace_back(t, flat);
      } else {
        flat = t.contiguous();
        if (a.access == Access::ReadWrite) {
          out.write_backs_.emplace_back(t, flat);
        } else {
          out.stand_ins_.push_back(flat);
        }
      }
      out.flat.addresses[l++].push_back(address(flat, a.access));
    }
  }
  return out;
}

PreparedLists prepare_perturb_lists(TensorRefs params, TensorRefs grads, TensorRefs backups, TensorRefs ascent) {
  if (ascent.empty()) {
    return prepare_lists("perturb_", {{"params", params, Access::ReadWrite}, {"grads", grads, Access::Read},
                                      {"backups", backups, Access::Write}});
  }
  return prepare_lists("perturb_", {{"params", params, Access::ReadWrite}, {"grads", grads, Access::Read},
                                    {"backups", backups, Access::Write}, {"ascent", ascent, Access::Write}});
}

at::Tensor scalar_on(const char* op, const char* name, const at::Tensor& t, at::Device device,
                     int64_t numel) {
  TORCH_CHECK(t.defined() && t.numel() == numel, "fastsam.", op, ": ", name, " must have ", numel,
              " element(s), got shape ", t.sizes());
  TORCH_CHECK(t.device() == device || (t.is_cpu() && t.dim() == 0), "fastsam.", op, ": ", name,
              " is on ", t.device(), " but the tensors are on ", device);
  return t.to(device, at::kFloat).contiguous();
}

at::Tensor seed_on(const char* op, const at::Tensor& seed, at::Device device) {
  TORCH_CHECK(seed.defined() && seed.numel() == 1 && seed.scalar_type() == at::kLong, "fastsam.", op,
              ": seed must be a one-element int64 tensor, got ", seed.defined() ? seed.toString() : "undefined",
              " of shape ", seed.sizes());
  TORCH_CHECK(seed.device() == device || seed.is_cpu(), "fastsam.", op, ": seed is on ", seed.device(),
              " but the tensors are on ", device);
  return seed.to(device).contiguous();
}

void check_exponent(const char* op, const char* name, int64_t value, int64_t max) {
  TORCH_CHECK(value >= 0 && value <= max, "fastsam.", op, ": ASAM exponent ", name, " must be in [0, ",
              max, "], got ", value);
}

}  // namespace fastsam
