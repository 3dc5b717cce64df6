// The element-wise arithmetic of the efficient variants' ops (docs/ALGORITHMS.md §9), written
// once for the CPU and the CUDA kernels, like math.h. The order of operations follows
// fastsam/ops/reference.py, so fp32 results agree with it to ~1 ulp.
#pragma once

#include "math.h"

namespace fastsam {
namespace math {

// LookSAM's c = <g, g_s> / (||g|| + eps)^2 from stats = [<g_s, g>, ||g||^2].
FASTSAM_HD float projection_coefficient(float dot, float g_sumsq, float eps) {
  const float n = ::sqrtf(g_sumsq) + eps;
  return dot / (n * n);
}

// LookSAM's refresh: g_v <- (0 if Init else g_v) + weight * (g_s - c * g).
template <bool Init>
FASTSAM_HD float projected(float gv, float gs, float g, float c, float weight) {
  const float orthogonal = gs - c * g;
  return Init ? weight * orthogonal : gv + weight * orthogonal;
}

// LookSAM's reuse step: the coefficient alpha * ||g|| / (||g_v|| + eps) of g_v ...
FASTSAM_HD float reuse_coefficient(float grad_sumsq, float gv_sumsq, float alpha, float eps) {
  return alpha * ::sqrtf(grad_sumsq) / (::sqrtf(gv_sumsq) + eps);
}

// ... and g + coefficient * g_v.
FASTSAM_HD float combined(float g, float gv, float coefficient) {
  return g + coefficient * gv;
}

// Friendly SAM: the direction g - sigma * m (the old EMA) and the EMA lam * m + (1 - lam) * g.
FASTSAM_HD float friendly_direction(float g, float m, float sigma) {
  return g - sigma * m;
}

FASTSAM_HD float friendly_ema(float g, float m, float lam, float one_minus_lam) {
  return lam * m + one_minus_lam * g;
}

}  // namespace math
}  // namespace fastsam
