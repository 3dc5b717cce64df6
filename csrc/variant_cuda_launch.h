// The boundary between variant_cuda.cpp (torch side) and variant_kernels.cu (kernels) for
// the efficient variants' ops: plain pointers only, as in cuda_launch.h.
#pragma once

#include "cuda_launch.h"

namespace fastsam {
namespace cuda {

// gv (+)= weight * (g_s - c g), c from stats = [<g_s, g>, ||g||^2]; lists: gv, g_s, g.
void launch_looksam_project(Dtype dtype, bool init, const FlatLists& lists, const float* stats, float weight,
                            float eps, Stream stream);
// g += alpha * sqrt(*grad_sumsq) / (sqrt(*gv_sumsq) + eps) * gv; lists: g, gv.
void launch_looksam_combine(Dtype dtype, const FlatLists& lists, const float* grad_sumsq, const float* gv_sumsq,
                            float alpha, float eps, Stream stream);
// direction and EMA (lists: direction, ema, g); one partial sum of direction^2 per block.
void launch_friendly_direction(Dtype dtype, bool init, const FlatLists& lists, float* partials, float sigma,
                               float lam, float one_minus_lam, Stream stream);

}  // namespace cuda
}  // namespace fastsam
