// Element hashing for fingerprints.
//
// A fingerprint sum is  sum_i mix(bits_i XOR (i * GOLDEN))  over a tensor's elements in
// row-major order, wrapping modulo 2^64. Addition modulo 2^64 is associative and commutative,
// so any chunking, thread count, reduction order or atomics give the same value, on CPU and
// CUDA alike. Mixing the position into each term makes swapped elements change the sum, and
// the mixer is a bijection on 64-bit words, so a single flipped bit always changes its term.
//
// The dtype and shape are folded in afterwards, in Python (replay/fingerprint.py), so that the
// kernels only deal with raw element bits.
#pragma once

#include "common.h"

namespace replay {
namespace kernels {

constexpr uint64_t kFingerprintGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kFingerprintMul = 0xD6E8FEB86659FD93ULL;

// A bijective 64-bit mixer (xor-shift / odd multiply rounds).
REPLAY_HD uint64_t fingerprint_mix(uint64_t x) {
  x ^= x >> 32;
  x *= kFingerprintMul;
  x ^= x >> 32;
  x *= kFingerprintMul;
  x ^= x >> 32;
  return x;
}

// The term element `index` with raw bits `bits` (zero-extended to 64 bits) adds to the sum.
REPLAY_HD uint64_t fingerprint_term(uint64_t bits, uint64_t index) {
  return fingerprint_mix(bits ^ (index * kFingerprintGolden));
}

REPLAY_HD uint64_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(static_cast<uint32_t>(__float_as_uint(x)));
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return static_cast<uint64_t>(u);
#endif
}

}  // namespace kernels
}  // namespace replay
