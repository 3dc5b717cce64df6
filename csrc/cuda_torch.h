// What the torch-facing CUDA op files (cuda_ops.cpp, base_step_cuda.cpp, variant_cuda.cpp)
// share: the kernel dtype of a tensor dtype and the current stream of a device.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cuda_launch.h"

namespace fastsam {
namespace cuda {

inline Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK(false, "fastsam: unsupported dtype ", t);
  }
}

inline Stream current_stream(at::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

}  // namespace cuda
}  // namespace fastsam
