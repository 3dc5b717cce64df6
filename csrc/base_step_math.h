// The element-wise arithmetic of the fused base steps and the one-pass unperturb chain
// (fastsam/ops/__init__.py: sgd_step_, adam_step_, restore_gsam_reduce,
// gsam_combine_accumulate_, restore_accumulate_), written once for the CPU and the CUDA
// kernels. Values are fp32 whatever the storage dtype and are rounded once, on the store.
//
// The order of operations is torch.optim's single-tensor path (torch/optim/sgd.py and
// adam.py, torch 2.14), op by op, so that fp32 results agree with torch to ~1 ulp (torch's
// vectorised CPU kernels use fused multiply-adds, these formulas do not):
//   SGD:  grad.add(param, alpha=wd); buf.mul_(momentum).add_(grad, alpha=1 - dampening);
//         grad.add(buf, alpha=momentum); param.add_(grad, alpha=-lr)
//   Adam: param.mul_(1 - lr * wd) or grad.add(param, alpha=wd); exp_avg.lerp_(grad, 1 - beta1);
//         exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2);
//         denom = (sqrt(v) / bc2_sqrt).add_(eps); param.addcdiv_(exp_avg, denom, value=-step_size)
// Scalars that torch computes in double on the host (Python floats: 1 - dampening,
// step_size, ...) are computed in double here too and converted to float once.
#pragma once

#include <cmath>

#include "math.h"

namespace fastsam {
namespace math {

// ---- the gradient chain: what the step consumes instead of g --------------------------
// The element loops are branch-free so that the compiler vectorises them (with the options
// as run-time branches GCC vectorised none of the Adam loops: "control flow in loop", and a
// 25M-element AdamW step took 153 ms against 81 ms for torch's fused CPU kernel, 1 thread).
// Options that are exact arithmetic identities stay run-time values (d / 1, d * -1, w * 1,
// selects); the one that is not (L2 weight decay: d + 0 * w is NaN for an infinite w, where
// torch leaves d alone) is a template parameter.

// The descent direction d before the optimizer's own math: GSAM's combination of g with the
// ascent copy (gsam_combined, math.h), then the sub-batch accumulator (acc + scale * d), then
// GradScaler's unscaling (d / grad_scale, as torch's fused optimizers divide), then maximize.
struct ChainScalars {
  GsamCoefficients gsam;
  float alpha = 0.0f;
  float accum_scale = 1.0f;
  float grad_scale = 1.0f;  // 1 without a GradScaler: d / 1 == d exactly
  float sign = 1.0f;        // -1 with maximize: d * -1 == -d exactly
};

template <bool Gsam, bool Accum>
FASTSAM_HD float chain_direction(float g, float g_asc, float acc, const ChainScalars& c) {
  float d = g;
  if constexpr (Gsam) d = gsam_combined(d, g_asc, c.gsam, c.alpha);
  if constexpr (Accum) d = accumulated<false>(acc, d, c.accum_scale);
  return (d / c.grad_scale) * c.sign;
}

// ---- SGD -------------------------------------------------------------------------------

struct SgdScalars {
  float neg_lr;               // -lr
  float weight_decay;         // used when L2 (weight_decay != 0)
  float momentum;             // used when the step has momentum buffers
  float one_minus_dampening;  // (float)(1 - dampening), computed in double
  bool nesterov;
  bool first;  // the buffers hold nothing yet: buf <- d (torch clones d); buf's value is ignored
};

// One SGD step of parameter value `w` (the source: the SAM backup) with direction d; `buf`
// is read (ignored when first) and written when Momentum.
template <bool Momentum, bool L2>
FASTSAM_HD float sgd_update(float w, float d, float& buf, const SgdScalars& s) {
  if constexpr (L2) d = d + s.weight_decay * w;
  if constexpr (Momentum) {
    const float continued = buf * s.momentum + s.one_minus_dampening * d;
    buf = s.first ? d : continued;
    d = s.nesterov ? d + s.momentum * buf : buf;
  }
  return w + s.neg_lr * d;
}

// ---- Adam / AdamW -------------------------------------------------------------------------

// Hyper-parameters shared by every tensor of a call.
struct AdamHyper {
  double lr;            // the float lr, or the lr tensor's value
  bool lr_is_tensor;    // torch then computes step_size and the decay in fp32 (tensor ops)
  double beta1, beta2;  // beta1 = 0 is allowed
  float eps;
  double weight_decay;
  bool decoupled;  // AdamW: w * (1 - lr * wd); Adam: d + wd * w (the L2 template parameter)
};

// Per-tensor scalars from the tensor's step count (already incremented).
struct AdamScalars {
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float decay;          // 1 - lr * wd with decoupled weight decay, else 1 (w * 1 == w exactly)
  // torch.lerp(m, d, 1 - beta1) = base + coeff * (d - m), with base = m, coeff = 1 - beta1
  // when |1 - beta1| < 0.5, else base = d, coeff = -beta1' where beta1' = 1 - (1 - beta1)
  // (ATen/native/Lerp.h: end - (end - self) * (1 - weight), the same rounding)
  bool lerp_from_self;
  float lerp_coeff;
  float beta2, one_minus_beta2;
  float weight_decay, eps;
};

// As torch's single-tensor Adam: bias corrections in double from the step count (a Python
// float there); with a tensor lr, `lr / bias_correction1` and `1 - lr * wd` are fp32 tensor
// ops in torch, and so they are here.
FASTSAM_HD AdamScalars adam_scalars(const AdamHyper& h, float step) {
  const double bc1 = 1.0 - ::pow(h.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - ::pow(h.beta2, static_cast<double>(step));
  AdamScalars s;
  if (h.lr_is_tensor) {
    const float lr = static_cast<float>(h.lr);
    s.neg_step_size = -(lr / static_cast<float>(bc1));
    s.decay = 1.0f - lr * static_cast<float>(h.weight_decay);
  } else {
    s.neg_step_size = static_cast<float>(-(h.lr / bc1));
    s.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  }
  if (!h.decoupled || h.weight_decay == 0.0) s.decay = 1.0f;
  const float weight = static_cast<float>(1.0 - h.beta1);
  s.lerp_from_self = ::fabsf(weight) < 0.5f;
  s.lerp_coeff = s.lerp_from_self ? weight : -(1.0f - weight);
  s.bc2_sqrt = static_cast<float>(::sqrt(bc2));
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.weight_decay = static_cast<float>(h.weight_decay);
  s.eps = h.eps;
  return s;
}

// torch.lerp(self, end, weight) with the scalar weight's form chosen in adam_scalars.
FASTSAM_HD float lerp(float self, float end, const AdamScalars& s) {
  return (s.lerp_from_self ? self : end) + s.lerp_coeff * (end - self);
}

// torch.maximum: NaN if either is NaN.
FASTSAM_HD float nan_maximum(float a, float b) {
  return ((a != a) | (b != b)) ? a + b : (a > b ? a : b);  // `|`: no short-circuit branch
}

// The new exp_avg and exp_avg_sq of direction d (w: the source value, for L2 weight decay).
template <bool L2>
FASTSAM_HD void adam_moments(float w, float d, float& m, float& v, const AdamScalars& s) {
  if constexpr (L2) d = d + s.weight_decay * w;
  m = lerp(m, d, s);
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * d * d;
}

// The new parameter from the source value w, the new exp_avg m and the second moment that
// normalises it (exp_avg_sq, or max_exp_avg_sq with amsgrad).
FASTSAM_HD float adam_param(float w, float m, float v_hat, const AdamScalars& s) {
  const float denom = ::sqrtf(v_hat) / s.bc2_sqrt + s.eps;
  return w * s.decay + (s.neg_step_size * m) / denom;
}

// found_inf: nonzero (GradScaler saw inf/nan) means "skip this step".
FASTSAM_HD bool step_skipped(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

}  // namespace math
}  // namespace fastsam
