// Launch planning: which work item (CPU) or thread block (CUDA) covers which elements of
// which tensor. Host code only, kept apart from the kernels so that tests can check on
// the CPU, exhaustively, that every element is covered exactly once and that no launch
// exceeds its slots (debug ops fastsam::_plan_cpu_items and fastsam::_plan_cuda_launches).
#pragma once

#include <c10/macros/Macros.h>

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
// launch carries up to max_tensors tensor slots in its kernel argument, and for each slot
// the launch block where its chunks start and the chunk they start at; a block finds its
// slot by binary search over those starts (multi_tensor_apply.cuh), so the argument holds
// nothing per block and a launch may have up to max_blocks blocks. A new launch starts
// when the slots or the blocks fill; a tensor whose chunks do not fit continues in the next
// (it then occupies a slot in both). Empty tensors get no slot. Launches therefore grow
// with total size / (max_blocks * chunk_size) and with tensors / max_tensors, never one
// per tensor.
struct PlannedLaunch {
  std::vector<int64_t> tensors;           // tensor index (into the op's lists) for each slot
  std::vector<int32_t> slot_first_block;  // launch block where each slot's chunks start
  std::vector<int32_t> slot_first_chunk;  // the chunk (of its tensor) that block covers
  int64_t blocks = 0;                     // blocks in this launch
  int64_t first_block = 0;                // index of block 0 among all blocks of the op (partials)
};

std::vector<PlannedLaunch> plan_launches(const std::vector<int64_t>& numels, int64_t chunk_size,
                                         int64_t max_tensors, int64_t max_blocks);

// The slot that launch block `block` belongs to: the last of the `slots` slots whose first
// block (`slot_first_block`, ascending from 0) is at or before it. The CUDA kernel calls
// this for its block; the `_plan_cuda_launches` debug op calls it for every block, so the
// CPU tests check the lookup the GPU runs.
C10_HOST_DEVICE inline int slot_of_block(const int32_t* slot_first_block, int slots, int32_t block) {
  int lo = 0, hi = slots - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (slot_first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Elements per CPU work item (64 KiB of fp32). The time of a sub-step does not depend on
// it between 4096 and 262144 elements (benchmarks/README.md, "Tuning constants").
constexpr int64_t kCpuItemSize = 16384;

// The CUDA launch configuration (multi_tensor_apply.cuh checks that a launch's argument
// fits the kernel-parameter limit). Depth = number of tensor lists an op walks.
// Elements per thread block: the default; FASTSAM_CUDA_CHUNK_SIZE overrides it (a multiple
// of kIlp * kCudaBlockThreads = 2048), read once (cuda_chunk_size()). 8192 to 32768 are
// equally fast on an H200 (benchmarks/README.md, "Tuning constants").
constexpr int64_t kCudaChunkSize = 16384;
constexpr int kCudaBlockThreads = 512;
constexpr int64_t kCudaMaxBlocks = 8192;  // blocks per launch (block indices stay int32)
constexpr int kCudaMaxDepth = 4;
// Slots of a launch whose argument fits the classic 4 KiB kernel-parameter limit:
// 8 bytes of address per list, 8 of length, 2 x 4 of block/chunk starts and 4 of the
// tensor's list position per slot (multi_tensor_apply.cuh checks the sizes).
constexpr int64_t cuda_max_tensors(int depth) {
  return depth == 1 ? 136 : depth == 2 ? 105 : depth == 3 ? 86 : 73;
}
// Slots of a launch whose argument uses CUDA 12.1's 32 KiB limit (sm_70 and newer, built
// with CUDA >= 12.1), for lists that do not fit 4 KiB: one launch per op instead of two
// for ResNet-50's 161 tensors, which avoids a launch gap and a partial wave (the effect
// is measured in benchmarks/README.md, "Tuning constants"). Lists that fit 4 KiB keep it.
constexpr int64_t cuda_max_tensors_large(int depth) {
  return depth == 1 ? 1164 : depth == 2 ? 905 : depth == 3 ? 741 : 627;
}
// The slots per launch the launcher uses for `tensors` non-empty tensors over `depth`
// lists: the 4 KiB argument when they fit in it or large arguments are off, else the large one.
constexpr int64_t cuda_slots_for(int depth, int64_t tensors, bool large_params) {
  return large_params && tensors > cuda_max_tensors(depth) ? cuda_max_tensors_large(depth) : cuda_max_tensors(depth);
}

// Whether launches may use the 32 KiB argument: unless FASTSAM_CUDA_LARGE_PARAMS=0 (for
// measuring against the 4 KiB launches), read once; the CUDA code adds whether it was
// built with CUDA >= 12.1 (cuda::large_params_built()).
bool cuda_large_params_requested();

// Elements per CUDA thread block in use: kCudaChunkSize unless FASTSAM_CUDA_CHUNK_SIZE is set.
int64_t cuda_chunk_size();

}  // namespace fastsam
