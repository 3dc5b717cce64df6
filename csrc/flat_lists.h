// Up to kMaxLists parallel lists of flat arrays (one address per list and tensor position)
// with one length per position: what the CPU loops and the CUDA launcher walk. Plain
// pointers only, so the CUDA kernels' translation unit needs no torch headers.
#pragma once

#include <cstdint>
#include <vector>

namespace fastsam {

// 9: adam_step_ with amsgrad, GSAM's ascent, an accumulator and the step counts (the
// element-wise ops of the SAM sub-step use at most 4)
constexpr int kMaxLists = 9;

struct FlatLists {
  int depth = 0;
  std::vector<void*> addresses[kMaxLists];  // addresses[list][position]
  std::vector<int64_t> numels;              // numels[position]

  size_t size() const { return numels.size(); }
  template <typename T>
  T* at(int list, size_t position) const {
    return static_cast<T*>(addresses[list][position]);
  }
};

}  // namespace fastsam
