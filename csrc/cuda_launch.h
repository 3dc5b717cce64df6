// The boundary between the torch-facing CUDA ops (cuda_ops.cpp, host C++) and the CUDA
// kernels (cuda_kernels.cu). Only plain pointers cross it, so the .cu file needs no torch
// headers: nvcc then parses c10's scalar types instead of ATen, which keeps the CUDA
// build short (measured: the .cu with ATen + torch/library.h took ~40 s of CPU for one
// arch, dominated by header parsing rather than code generation).
#pragma once

#include <cstdint>
#include <vector>

#include "flat_lists.h"

struct CUstream_st;  // = cudaStream_t

namespace fastsam {
namespace cuda {

using Stream = CUstream_st*;

enum class Dtype { kFloat, kHalf, kBFloat16 };

// Whether this build launches with arguments over 4 KiB (CUDA >= 12.1; plan.h).
bool large_params_built();

// Partials one reduction writes: one per planned block (plan.h), `width` floats each.
int64_t planned_blocks(const std::vector<int64_t>& numels);

void launch_sumsq(Dtype dtype, int b, const FlatLists& lists, float* partials, float eta, Stream stream);
// ascent_mode: 0 none, 1 raw copy of g, 2 g / (sqrt(*ascent_sumsq) + eps); seed: nullptr to
// round to nearest, else stochastic rounding of bf16/fp16 results (math.h)
void launch_perturb(Dtype dtype, int a, int ascent_mode, const FlatLists& lists, const float* sumsq,
                    const float* ascent_sumsq, const int64_t* seed, float rho, float eta, float eps, Stream stream);
void launch_restore(int element_size, const FlatLists& lists, Stream stream);
void launch_gsam_reduce(Dtype dtype, const FlatLists& lists, float* partials, Stream stream);
void launch_gsam_combine(Dtype dtype, const FlatLists& lists, const float* stats, float alpha, float eps,
                         Stream stream);
void launch_accumulate(Dtype dtype, bool init, const FlatLists& lists, float scale, Stream stream);
// Second phase of a reduction: out[0..width) = sums of the `count` partials.
void launch_finish_sum(int width, const float* partials, int64_t count, float* out, Stream stream);

}  // namespace cuda
}  // namespace fastsam
