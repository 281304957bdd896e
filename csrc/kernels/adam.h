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

struct AdamScalars {
  float lerp_weight;     // 1 - beta1
  float beta2;           // beta2
  float one_minus_beta2; // 1 - beta2
  float eps;             // eps
  float weight_decay;    // weight_decay (Adam's L2 term)
  float decay_factor;    // 1 - lr * weight_decay (AdamW's decoupled decay)
  bool has_weight_decay; // weight_decay != 0
  bool decoupled;        // AdamW
  bool amsgrad;
  bool maximize;
};

// Updates param (decoupled decay only), exp_avg, exp_avg_sq and max_exp_avg_sq in place and
// returns the value whose square root is the denominator.
template <bool kFused>
REPLAY_HD float adam_moments(float& param, float grad, float& exp_avg, float& exp_avg_sq,
                             float& max_exp_avg_sq, const AdamScalars& s) {
  float g = s.maximize ? -grad : grad;
  if (s.has_weight_decay) {
    if (s.decoupled) {
      param = param * s.decay_factor;
    } else {
      g = madd<kFused>(param, s.weight_decay, g);
    }
  }
  exp_avg = lerp<kFused>(exp_avg, g, s.lerp_weight);
  exp_avg_sq = madd<kFused>(s.one_minus_beta2 * g, g, exp_avg_sq * s.beta2);
  if (s.amsgrad) {
    max_exp_avg_sq = maximum_propagate_nan(max_exp_avg_sq, exp_avg_sq);
    return max_exp_avg_sq;
  }
  return exp_avg_sq;
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
