// Launch planning: which work item (CPU) or thread block (CUDA) covers which elements of
// which tensor. Host code only, kept apart from the kernels so that tests can check on
// the CPU, exhaustively, that every element is covered exactly once and that no launch
// exceeds its slots (debug ops fastsam::_plan_cpu_items and fastsam::_plan_cuda_launches).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastsam {

// ---- CPU: fixed-size items over the concatenation of all tensors ----------------------
//
// Item k covers elements [k * item_size, (k + 1) * item_size) of the virtual
// concatenation of the tensors, i.e. one or more (tensor, range) segments: a chunk of a
// large tensor, or a run of many tiny tensors. Items weigh the same, so at::parallel_for
// balances them, and a reduction's per-item partials (summed in item order) do not depend
// on the number of threads.
struct CpuItems {
  std::vector<int64_t> offsets;  // offsets[t] = first element of tensor t; back() = total
  int64_t item_size = 1;
  int64_t count = 0;  // number of items

  CpuItems(const std::vector<int64_t>& numels, int64_t item_size_) : item_size(item_size_) {
    offsets.resize(numels.size() + 1);
    offsets[0] = 0;
    for (size_t t = 0; t < numels.size(); ++t) offsets[t + 1] = offsets[t] + numels[t];
    count = (offsets.back() + item_size - 1) / item_size;
  }

  // Calls f(tensor, begin, end) for each segment of item k, in tensor order; begin/end
  // are element indices within that tensor (end exclusive, begin < end).
  template <typename F>
  void for_each_segment(int64_t k, F&& f) const {
    const int64_t begin = k * item_size;
    const int64_t end = std::min(begin + item_size, offsets.back());
    const int64_t tensors = static_cast<int64_t>(offsets.size()) - 1;
    // the last tensor starting at or before `begin` is non-empty and contains `begin`
    int64_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; t < tensors && offsets[t] < end; ++t) {
      const int64_t lo = std::max(begin, offsets[t]) - offsets[t];
      const int64_t hi = std::min(end, offsets[t + 1]) - offsets[t];
      if (lo < hi) f(t, lo, hi);
    }
  }
};

// ---- CUDA: multi-tensor-apply launches ---------------------------------------------------
//
// Each tensor is cut into chunks of chunk_size elements, one thread block per chunk. A
// launch carries up to max_tensors tensor slots and max_blocks blocks in its kernel
// argument; a new launch starts when either fills. A tensor whose chunks do not fit in
// one launch continues in the next (it then occupies a slot in both). Empty tensors get
// no slot. Launches therefore grow with total size / (max_blocks * chunk_size) and with
// tensors / max_tensors, never one per tensor.
struct PlannedBlock {
  int32_t slot;   // index into the launch's tensors
  int32_t chunk;  // chunk index within that tensor
};

struct PlannedLaunch {
  std::vector<int64_t> tensors;  // tensor index (into the op's lists) for each slot
  std::vector<PlannedBlock> blocks;
  int64_t first_block = 0;  // index of blocks[0] among all blocks of the op (partials)
};

std::vector<PlannedLaunch> plan_launches(const std::vector<int64_t>& numels, int64_t chunk_size,
                                         int64_t max_tensors, int64_t max_blocks);

// Elements per CPU work item (64 KiB of fp32). Not sensitive: a SAM sub-step on the
// ResNet-50 and 4096-tiny-tensor sets took the same time (within +-5%, medians of 15,
// interleaved, 2 busy cores) with items of 4096, 16384, 65536 and 262144 elements.
constexpr int64_t kCpuItemSize = 16384;

// The CUDA launch configuration (multi_tensor_apply.cuh checks that a launch's argument
// fits the 4 KiB kernel-parameter limit). Depth = number of tensor lists an op walks.
constexpr int64_t kCudaChunkSize = 65536;  // elements per thread block
constexpr int kCudaBlockThreads = 512;
constexpr int64_t kCudaMaxBlocks = 320;    // blocks per launch
constexpr int64_t cuda_max_tensors(int depth) {
  return depth == 1 ? 110 : depth == 2 ? 64 : depth == 3 ? 48 : 36;
}
constexpr int kCudaMaxDepth = 4;

}  // namespace fastsam
