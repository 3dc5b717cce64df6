// The element-wise arithmetic of every fastsam op, written once for the CPU and the CUDA
// kernels (FASTSAM_HD = host + device). Kernels load values, convert them to fp32, call
// these functions and round the result once into the tensor's dtype, so the CPU tests
// exercise exactly the formulas the GPU runs. The order of operations follows
// fastsam/ops/reference.py (e.g. (scale * T^a) * g), so fp32 results agree to ~1 ulp.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#define FASTSAM_HD C10_HOST_DEVICE inline

namespace fastsam {
namespace math {

// Formulas used by reductions are templates on the value type V: float on the GPU and in
// scalar CPU code, a 4-wide fp32 vector in the CPU reductions (cpu_kernels.cpp provides
// abs_value, + and * for it). Same expression either way, evaluated lane by lane.
FASTSAM_HD float abs_value(float x) {
  return ::fabsf(x);
}

// ASAM's T^P with T = |w| + eta (docs/ALGORITHMS.md §2), P in {0, 1, 2}. The exponent is a
// template parameter so that the kernels compile one branch-free loop per exponent.
template <int P, typename V>
FASTSAM_HD V adaptive_power(V w, float eta) {
  static_assert(P >= 0 && P <= 2, "ASAM exponents are 0, 1 or 2");
  if constexpr (P == 0) {
    return V{} + 1.0f;
  } else {
    const V t = abs_value(w) + eta;
    if constexpr (P == 1) {
      return t;
    } else {
      return t * t;
    }
  }
}

// 1 / (sqrt(s) + eps): the normalisation shared by the perturbation and GSAM's
// normalised ascent backup. IEEE sqrt and division on both sides (no fast math).
FASTSAM_HD float inverse_norm(float sumsq, float eps) {
  return 1.0f / (::sqrtf(sumsq) + eps);
}

// rho / (||T^b g|| + eps), computed from the (device-resident) sum of squares.
FASTSAM_HD float perturb_scale(float sumsq, float rho, float eps) {
  return rho * inverse_norm(sumsq, eps);
}

// One term of sumsq: (T^B * g)^2.
template <int B, typename V>
FASTSAM_HD V sumsq_term(V g, V w, float eta) {
  if constexpr (B == 0) {
    return g * g;
  } else {
    const V t = g * adaptive_power<B>(w, eta);
    return t * t;
  }
}

// The two terms of GSAM's reduction: <g_asc, g_p> and ||g_p||^2.
template <typename V>
FASTSAM_HD V dot_term(V g_asc, V gp) {
  return g_asc * gp;
}

// w + (scale * T^A) * g, T from the unperturbed w.
template <int A>
FASTSAM_HD float perturbed(float w, float g, float scale, float eta) {
  return w + (scale * adaptive_power<A>(w, eta)) * g;
}

// The same with the exponent known only at run time (A in {0, 1, 2}); the CUDA kernels
// use it to compile one kernel for all exponents (the branch is uniform across a warp,
// and the kernels are memory-bound).
FASTSAM_HD float perturbed(float w, float g, float scale, float eta, int a) {
  return a == 0 ? perturbed<0>(w, g, scale, eta)
                : a == 1 ? perturbed<1>(w, g, scale, eta) : perturbed<2>(w, g, scale, eta);
}

// GSAM's normalised ascent backup: g / (||g|| + eps), with inv = inverse_norm(...).
FASTSAM_HD float normalized_ascent(float g, float inv) {
  return g * inv;
}

// GSAM's scalars from stats = [<g_asc, g_p>, ||g_p||^2]: 1 / (||g_p|| + eps) and
// <g_asc, h> = <g_asc, g_p> / (||g_p|| + eps).
struct GsamCoefficients {
  float inv_gp_norm;
  float ascent_along_gp;
};

FASTSAM_HD GsamCoefficients gsam_coefficients(float dot, float gp_sumsq, float eps) {
  const float gp_norm = ::sqrtf(gp_sumsq) + eps;
  return GsamCoefficients{1.0f / gp_norm, dot / gp_norm};
}

// g_p - alpha * (g_asc - <g_asc, h> h) with h = g_p / (||g_p|| + eps).
FASTSAM_HD float gsam_combined(float gp, float g_asc, GsamCoefficients c, float alpha) {
  const float h = gp * c.inv_gp_norm;
  const float g_orth = g_asc - c.ascent_along_gp * h;
  return gp - alpha * g_orth;
}

// Sub-batch accumulation: scale * g (first contribution) or acc + scale * g.
template <bool Init>
FASTSAM_HD float accumulated(float acc, float g, float scale) {
  return Init ? scale * g : acc + scale * g;
}

}  // namespace math
}  // namespace fastsam
