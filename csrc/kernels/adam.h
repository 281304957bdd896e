// Adam / AdamW per-element arithmetic (numerics.md "Adam / AdamW").
//
// The step is split in two around the square root, because the two numerics differ only
// there: portable numerics use an IEEE sqrt, torch numerics on CPU use the same vector sqrt
// routine torch itself calls (MKL's vmsSqrt, which is not correctly rounded). The CPU kernel
// runs adam_moments over a block, takes the square roots of the block, then runs adam_param.
#pragma once

#include "common.h"

namespace replay {
namespace kernels {

// Scalars computed on the host in double exactly as torch.optim does, rounded to float once
// (make_adam_scalars); flags arrive as masks (see select_by_mask).
struct AdamScalars {
  LerpWeight lerp_weight; // 1 - beta1
  float beta2;            // beta2
  float one_minus_beta2;  // 1 - beta2
  float eps;              // eps
  float weight_decay;     // weight_decay (Adam's L2 term)
  float decay_factor;     // 1 - lr * weight_decay (AdamW's decoupled decay)
  uint32_t maximize_sign; // sign_mask_of(maximize)
  uint32_t l2_mask;       // mask_of(weight_decay != 0 && !decoupled)
  uint32_t decoupled_mask;// mask_of(weight_decay != 0 && decoupled)
  uint32_t amsgrad_mask;  // mask_of(amsgrad)
};

REPLAY_HD AdamScalars make_adam_scalars(double lerp_weight, double beta2, double one_minus_beta2,
                                        double eps, double weight_decay, double decay_factor,
                                        bool decoupled, bool amsgrad, bool maximize) {
  const bool has_weight_decay = weight_decay != 0.0;
  return AdamScalars{make_lerp_weight(static_cast<float>(lerp_weight)),
                     static_cast<float>(beta2),
                     static_cast<float>(one_minus_beta2),
                     static_cast<float>(eps),
                     static_cast<float>(weight_decay),
                     static_cast<float>(decay_factor),
                     sign_mask_of(maximize),
                     mask_of(has_weight_decay && !decoupled),
                     mask_of(has_weight_decay && decoupled),
                     mask_of(amsgrad)};
}

// Updates param (decoupled decay only), exp_avg, exp_avg_sq and max_exp_avg_sq in place and
// returns the value whose square root is the denominator. Options are computed and selected
// rather than branched to, so that CPU loops vectorize.
template <bool kFused>
REPLAY_HD float adam_moments(float& param, float grad, float& exp_avg, float& exp_avg_sq,
                             float& max_exp_avg_sq, const AdamScalars& s) {
  const float g_raw = flip_sign(s.maximize_sign, grad);
  const float g = select_by_mask(s.l2_mask, madd<kFused>(param, s.weight_decay, g_raw), g_raw);
  param = select_by_mask(s.decoupled_mask, param * s.decay_factor, param);
  exp_avg = lerp<kFused>(exp_avg, g, s.lerp_weight);
  exp_avg_sq = madd<kFused>(s.one_minus_beta2 * g, g, exp_avg_sq * s.beta2);
  const float running_max = maximum_propagate_nan(max_exp_avg_sq, exp_avg_sq);
  max_exp_avg_sq = select_by_mask(s.amsgrad_mask, running_max, max_exp_avg_sq);
  return select_by_mask(s.amsgrad_mask, running_max, exp_avg_sq);
}

// The parameter update from the square root of adam_moments' result.
// neg_step_size = -lr / (1 - beta1^step), bias_correction2_sqrt = (1 - beta2^step) ** 0.5.
REPLAY_HD float adam_param(float param, float exp_avg, float root, float neg_step_size,
                           float bias_correction2_sqrt, float eps) {
  const float denom = root / bias_correction2_sqrt + eps;
  return param + (neg_step_size * exp_avg) / denom;
}

}  // namespace kernels
}  // namespace replay
