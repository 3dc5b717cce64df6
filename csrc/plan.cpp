// Multi-tensor-apply launch planner (see plan.h). Host code; used by the CUDA launcher and
// by the `_plan_cuda_launches` debug op that the CPU tests check exhaustively.
#include "plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>

namespace fastsam {

std::vector<PlannedLaunch> plan_launches(const std::vector<int64_t>& numels, int64_t chunk_size,
                                         int64_t max_tensors, int64_t max_blocks) {
  TORCH_CHECK(chunk_size > 0 && max_tensors > 0 && max_blocks > 0,
              "plan_launches: chunk_size, max_tensors and max_blocks must be positive");
  TORCH_CHECK(max_blocks <= std::numeric_limits<int32_t>::max(), "plan_launches: max_blocks must fit in int32");
  std::vector<PlannedLaunch> launches;
  PlannedLaunch current;
  int64_t blocks_so_far = 0;
  auto flush = [&]() {
    if (current.blocks > 0) {
      current.first_block = blocks_so_far;
      blocks_so_far += current.blocks;
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
    for (int64_t c = 0; c < chunks;) {
      if (static_cast<int64_t>(current.tensors.size()) == max_tensors || current.blocks == max_blocks) flush();
      const int64_t take = std::min(chunks - c, max_blocks - current.blocks);
      current.tensors.push_back(static_cast<int64_t>(t));
      current.slot_first_block.push_back(static_cast<int32_t>(current.blocks));
      current.slot_first_chunk.push_back(static_cast<int32_t>(c));
      current.blocks += take;
      c += take;
    }
  }
  flush();
  return launches;
}

int64_t cuda_chunk_size() {
  static const int64_t size = [] {
    const char* text = std::getenv("FASTSAM_CUDA_CHUNK_SIZE");
    if (text == nullptr || *text == '\0') return kCudaChunkSize;
    char* end = nullptr;
    const long long value = std::strtoll(text, &end, 10);
    const int64_t step = 4 * kCudaBlockThreads;  // kIlp elements per thread per step
    TORCH_CHECK(end != text && *end == '\0' && value > 0 && value % step == 0 && value <= (int64_t{1} << 30),
                "FASTSAM_CUDA_CHUNK_SIZE must be a positive multiple of ", step, " up to 2^30; got '", text, "'");
    return static_cast<int64_t>(value);
  }();
  return size;
}

bool cuda_large_params_requested() {
  static const bool requested = [] {
    const char* text = std::getenv("FASTSAM_CUDA_LARGE_PARAMS");
    if (text == nullptr || *text == '\0') return true;
    const std::string value(text);
    TORCH_CHECK(value == "0" || value == "1", "FASTSAM_CUDA_LARGE_PARAMS must be 0 or 1; got '", value, "'");
    return value == "1";
  }();
  return requested;
}

}  // namespace fastsam
