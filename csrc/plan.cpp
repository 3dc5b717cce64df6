// Multi-tensor-apply launch planner (see plan.h). Host code; used by the CUDA launcher and
// by the `_plan_cuda_launches` debug op that the CPU tests check exhaustively.
#include "plan.h"

#include <c10/util/Exception.h>

#include <limits>

namespace fastsam {

std::vector<PlannedLaunch> plan_launches(const std::vector<int64_t>& numels, int64_t chunk_size,
                                         int64_t max_tensors, int64_t max_blocks) {
  TORCH_CHECK(chunk_size > 0 && max_tensors > 0 && max_blocks > 0,
              "plan_launches: chunk_size, max_tensors and max_blocks must be positive");
  std::vector<PlannedLaunch> launches;
  PlannedLaunch current;
  int64_t blocks_so_far = 0;
  auto flush = [&]() {
    if (!current.blocks.empty()) {
      current.first_block = blocks_so_far;
      blocks_so_far += static_cast<int64_t>(current.blocks.size());
      launches.push_back(std::move(current));
    }
    current = PlannedLaunch();
  };
  for (size_t t = 0; t < numels.size(); ++t) {
    const int64_t n = numels[t];
    TORCH_CHECK(n >= 0, "plan_launches: negative numel");
    const int64_t chunks = (n + chunk_size - 1) / chunk_size;
    TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(),
                "plan_launches: tensor ", t, " has more than 2^31 chunks");
    for (int64_t c = 0; c < chunks; ++c) {
      if (current.tensors.empty() || current.tensors.back() != static_cast<int64_t>(t)) {
        if (static_cast<int64_t>(current.tensors.size()) == max_tensors) flush();
        current.tensors.push_back(static_cast<int64_t>(t));
      }
      const int32_t slot = static_cast<int32_t>(current.tensors.size() - 1);
      current.blocks.push_back(PlannedBlock{slot, static_cast<int32_t>(c)});
      if (static_cast<int64_t>(current.blocks.size()) == max_blocks) flush();
    }
  }
  flush();
  return launches;
}

}  // namespace fastsam
