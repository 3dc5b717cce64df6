// The element-wise arithmetic of every fastsam op, written once for the CPU and the CUDA
// kernels (FASTSAM_HD = host + device). Kernels load values, convert them to fp32, call
// these functions and round the result once into the tensor's dtype, so the CPU tests
// exercise exactly the formulas the GPU runs. The order of operations follows
// fastsam/ops/reference.py (e.g. (scale * T^a) * g), so fp32 results agree to ~1 ulp.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// ---- stochastic rounding of perturbed low-precision weights ----------------------------
//
// Rounding w + eps to the nearest bf16/fp16 value drops every perturbation smaller than
// half a unit in the last place of w, which at realistic model sizes is most of them (the
// per-element step rho g / ||g|| falls with the square root of the parameter count).
// Rounding to one of the two neighbours of x = w + eps (computed in fp32), with
// probability proportional to closeness, makes the rounded perturbation unbiased.
//
// The random bits are a hash of (seed, tensor position t in the op's list, element index e
// in that tensor's flat walk), so every backend draws the same bits for an element and
// the result does not depend on how the work is split. fmix32 is MurmurHash3's 32-bit
// finaliser (public domain), an avalanching bijection.

FASTSAM_HD uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

// The part of the hash shared by all elements of tensor t (and of one 2^32-element half).
FASTSAM_HD uint32_t rounding_key(uint64_t seed, uint32_t t, uint32_t element_high) {
  const uint32_t k = fmix32(fmix32(fmix32(t ^ 0x9e3779b9u) ^ static_cast<uint32_t>(seed >> 32)) ^
                            static_cast<uint32_t>(seed));
  return fmix32(k ^ element_high);
}

FASTSAM_HD uint32_t rounding_bits(uint32_t key, uint32_t element_low) {
  return fmix32(element_low ^ key);
}

FASTSAM_HD uint32_t float_bits(float x) {
  uint32_t b;
  memcpy(&b, &x, sizeof(b));
  return b;
}

FASTSAM_HD float bits_float(uint32_t b) {
  float x;
  memcpy(&x, &b, sizeof(x));
  return x;
}

// The bf16 case on bits only, without control flow (bitwise & for the conditions, plain
// selects), so that the CPU loop vectorises; with branches it did not, and stochastic
// rounding took 4.7x as long as rounding to nearest on 25.6M bf16 weights (measured on
// this project's CPU). Same values as the generic version below: round to nearest even
// by the carry trick, NaN to c10's quiet NaN 0x7fc0.
FASTSAM_HD uint16_t stochastically_rounded_bf16(float x, uint32_t bits) {
  const uint32_t xb = float_bits(x);
  const uint32_t r = (xb + 0x7fffu + ((xb >> 16) & 1u)) >> 16;  // round to nearest even
  const float rf = bits_float(r << 16);
  const uint32_t away = ::fabsf(x) > ::fabsf(rf);
  const uint32_t o = r - 1u + 2u * away;  // the other neighbour: one step away from r, towards x
  const float p = ::fabsf(x - rf) / ::fabsf(bits_float(o << 16) - rf);
  const float u = static_cast<float>(bits >> 8) * 5.9604644775390625e-08f;  // 2^-24
  const uint32_t take_other = static_cast<uint32_t>(rf != x) & static_cast<uint32_t>(u < p);
  const uint32_t chosen = take_other ? o : r;
  return static_cast<uint16_t>(x != x ? 0x7fc0u : chosen);
}

// x rounded to one of its two neighbours in T (c10::BFloat16 or c10::Half): the nearest
// one, r, or the other, o, with probability |x - r| / |o - r| (exact in fp32: both
// differences are differences of nearby floats). u = the top 24 bits of `bits`, in [0, 1).
// The other neighbour of the largest finite value is inf, which is never chosen (p = 0).
template <typename T>
FASTSAM_HD T stochastically_rounded(float x, uint32_t bits) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return T(stochastically_rounded_bf16(x, bits), T::from_bits());
  } else {
    const T r(x);  // round to nearest even
    const float rf = static_cast<float>(r);
    if (rf == x || x != x) return r;  // exact, or NaN
    const uint16_t magnitude = r.x & 0x7fffu, sign = r.x & 0x8000u;
    const bool away = ::fabsf(x) > ::fabsf(rf);
    const T o(static_cast<uint16_t>(sign | (away ? magnitude + 1u : magnitude - 1u)), T::from_bits());
    const float p = ::fabsf(x - rf) / ::fabsf(static_cast<float>(o) - rf);
    const float u = static_cast<float>(bits >> 8) * 5.9604644775390625e-08f;  // 2^-24
    return u < p ? o : r;
  }
}

}  // namespace math
}  // namespace fastsam
