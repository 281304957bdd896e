// EMA per-element arithmetic.
//
//   average <- lerp(average, source, w),   w = 1 - decay (rounded to float once, on the host)
//
// with torch.lerp's two-branch formula and one FMA:
//   w <  0.5:  average = fma(w,     source - average, average)
//   w >= 0.5:  average = fma(w - 1, source - average, source)
// so for finite values decay == 0 copies the source and decay == 1 leaves the average as it was
// (up to the sign of a zero: 0 * d + -0.0 is +0.0; an inf or NaN makes the result NaN). It is
// the formula of torch's vectorized `average.lerp_(source, w)` on an FMA-capable CPU dispatch
// (torch's scalar tail can differ in the sign of a zero).
#pragma once

#include "common.h"

namespace replay {
namespace kernels {

// `weight` comes from make_lerp_weight(static_cast<float>(1 - decay)), prepared on the host.
REPLAY_HD float ema_element(float average, float source, const LerpWeight& weight) {
  return lerp<true>(average, source, weight);
}

}  // namespace kernels
}  // namespace replay
