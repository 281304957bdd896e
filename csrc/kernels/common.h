// Shared building blocks for the per-element arithmetic of every replay kernel.
//
// Everything under csrc/kernels/ is torch-free and written as inline __host__ __device__
// functions: the CPU loops (csrc/cpu/) and the CUDA kernels (csrc/cuda/) call exactly these
// functions, so there is one source of truth for the bits both devices produce.
//
// Floating-point rules (see shared/notes/numerics.md):
//  * host code is compiled with -ffp-contract=off and CUDA code with --fmad=false, so the
//    compiler never fuses a multiply and an add on its own;
//  * every fused multiply-add that the recipe wants is written explicitly through madd<true>;
//  * madd<false> is a separate multiply and add, which is what torch computes when its CPU
//    dispatch has no FMA (ATEN_CPU_CAPABILITY=default).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define REPLAY_HD __host__ __device__ __forceinline__
#else
#define REPLAY_HD inline __attribute__((always_inline))
#endif

namespace replay {
namespace kernels {

// a * b + c, with one rounding when kFused, two otherwise.
template <bool kFused>
REPLAY_HD float madd(float a, float b, float c) {
  if constexpr (kFused) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);  // FMA_SITE: the only way an fma reaches the PTX
#else
    return std::fma(a, b, c);  // FMA_SITE
#endif
  } else {
    return a * b + c;
  }
}

// torch.lerp's formula (ATen lerp_vec): for weights below one half it walks from `start`,
// otherwise it walks back from `end`, so that weight == 1 gives `end` exactly.
template <bool kFused>
REPLAY_HD float lerp(float start, float end, float weight) {
  const float diff = end - start;
  return (weight < 0.5f && weight > -0.5f) ? madd<kFused>(weight, diff, start)
                                    : madd<kFused>(weight - 1.0f, diff, end);
}

// torch.maximum semantics: NaN in either input propagates.
REPLAY_HD float maximum_propagate_nan(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

}  // namespace kernels
}  // namespace replay
