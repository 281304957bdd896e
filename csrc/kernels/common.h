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

REPLAY_HD uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

REPLAY_HD float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Option flags travel to the kernels as bit masks (all ones or zero) prepared on the host,
// and are applied with bit operations: `select_by_mask(mask, a, b)` is exactly
// `mask ? a : b`. The reason is speed, not value: GCC does not vectorize a ternary on a
// scalar flag, and it turns a mask it can see being made from a bool back into one.
REPLAY_HD uint32_t mask_of(bool condition) { return condition ? 0xFFFFFFFFu : 0u; }

REPLAY_HD float select_by_mask(uint32_t mask, float a, float b) {
  return float_of((bits_of(a) & mask) | (bits_of(b) & ~mask));
}

// x with its sign bit flipped where `sign_mask` is 0x80000000: exactly torch's neg.
REPLAY_HD float flip_sign(uint32_t sign_mask, float x) { return float_of(bits_of(x) ^ sign_mask); }

REPLAY_HD uint32_t sign_mask_of(bool negate) { return negate ? 0x80000000u : 0u; }

// A lerp weight prepared on the host: torch.lerp's formula (ATen lerp_vec) walks from `start`
// for weights below one half and back from `end` otherwise, so that weight == 1 gives `end`
// exactly: lerp = fma(coeff, end - start, base), coeff = w or w - 1, base = start or end.
struct LerpWeight {
  float coeff;
  uint32_t from_start_mask;  // all ones: base = start (|w| < 0.5)
};

REPLAY_HD LerpWeight make_lerp_weight(float weight) {
  const bool small = weight < 0.5f && weight > -0.5f;
  return LerpWeight{small ? weight : weight - 1.0f, mask_of(small)};
}

template <bool kFused>
REPLAY_HD float lerp(float start, float end, const LerpWeight& w) {
  return madd<kFused>(w.coeff, end - start, select_by_mask(w.from_start_mask, start, end));
}

// The one NaN the portable kernels store: 0x7FFFFFFF, the NaN an NVIDIA GPU's arithmetic
// produces. x86 writes 0xFFC00000 for an invalid operation (inf - inf, 0 * inf) and passes an
// input NaN's payload through, so without this a NaN's bits, and every fingerprint that hashes
// them, depended on the device and on which NaN came in. Applied to every stored value.
constexpr uint32_t kCanonicalNanBits = 0x7FFFFFFFu;

REPLAY_HD float canonical_nan(float x) {
  return select_by_mask(mask_of(x != x), float_of(kCanonicalNanBits), x);
}

// torch.maximum semantics: NaN in either input propagates.
REPLAY_HD float maximum_propagate_nan(float a, float b) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  return a_nan ? a : (b_nan ? b : (a > b ? a : b));
}

}  // namespace kernels
}  // namespace replay
