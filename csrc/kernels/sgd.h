// SGD per-element arithmetic (torch.optim.SGD's single-tensor path, numerics.md "SGD").
#pragma once

#include "common.h"

namespace replay {
namespace kernels {

// Scalars are computed on the host in double, exactly as torch.optim does, and rounded to
// float once (make_sgd_scalars); flags arrive as masks (see select_by_mask).
struct SgdScalars {
  float weight_decay;        // weight_decay
  float momentum;            // momentum
  float one_minus_dampening; // 1 - dampening
  float neg_lr;              // -lr
  uint32_t maximize_sign;    // sign_mask_of(maximize)
  uint32_t decay_mask;       // mask_of(weight_decay != 0): torch skips the add otherwise
  uint32_t nesterov_mask;    // mask_of(nesterov)
  bool has_momentum;         // momentum != 0: no buffer exists otherwise
};

REPLAY_HD SgdScalars make_sgd_scalars(double weight_decay, double momentum,
                                      double one_minus_dampening, double neg_lr, bool nesterov,
                                      bool maximize) {
  return SgdScalars{static_cast<float>(weight_decay), static_cast<float>(momentum),
                    static_cast<float>(one_minus_dampening), static_cast<float>(neg_lr),
                    sign_mask_of(maximize), mask_of(weight_decay != 0.0), mask_of(nesterov),
                    momentum != 0.0};
}

// One element of one SGD step. `first_step_mask` (all ones) means the momentum buffer does
// not exist yet and starts as the (decayed) gradient, as torch does with grad.clone().
// Every option is computed and one selected, so that CPU loops vectorize.
template <bool kFused>
REPLAY_HD void sgd_element(float& param, float grad, float& momentum_buffer,
                           uint32_t first_step_mask, const SgdScalars& s) {
  const float g_raw = flip_sign(s.maximize_sign, grad);
  float g = select_by_mask(s.decay_mask, madd<kFused>(param, s.weight_decay, g_raw), g_raw);
  if (s.has_momentum) {
    momentum_buffer = select_by_mask(
        first_step_mask, g, madd<kFused>(g, s.one_minus_dampening, momentum_buffer * s.momentum));
    g = select_by_mask(s.nesterov_mask, madd<kFused>(momentum_buffer, s.momentum, g),
                       momentum_buffer);
  }
  param = madd<kFused>(g, s.neg_lr, param);
}

}  // namespace kernels
}  // namespace replay
