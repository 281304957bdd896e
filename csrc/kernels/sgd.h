// SGD per-element arithmetic (torch.optim.SGD's single-tensor path, numerics.md "SGD").
#pragma once

#include "common.h"

namespace replay {
namespace kernels {

// Scalars are computed on the host in double, exactly as torch.optim does, and rounded to
// float once when they enter the kernel.
struct SgdScalars {
  float weight_decay;        // weight_decay
  float momentum;            // momentum
  float one_minus_dampening; // 1 - dampening
  float neg_lr;              // -lr
  bool has_weight_decay;     // weight_decay != 0: torch skips the add entirely otherwise
  bool has_momentum;         // momentum != 0: no buffer exists otherwise
  bool nesterov;
  bool maximize;
};

// One element of one SGD step. `first_step` means the momentum buffer does not exist yet and
// is initialised to the (decayed) gradient, as torch does with grad.clone().
template <bool kFused>
REPLAY_HD void sgd_element(float& param, float grad, float& momentum_buffer, bool first_step,
                           const SgdScalars& s) {
  float g = s.maximize ? -grad : grad;
  if (s.has_weight_decay) g = madd<kFused>(param, s.weight_decay, g);
  if (s.has_momentum) {
    momentum_buffer = first_step ? g
                                 : madd<kFused>(g, s.one_minus_dampening, momentum_buffer * s.momentum);
    g = s.nesterov ? madd<kFused>(momentum_buffer, s.momentum, g) : momentum_buffer;
  }
  param = madd<kFused>(g, s.neg_lr, param);
}

}  // namespace kernels
}  // namespace replay
