// Element hashing for fingerprints.
//
// A fingerprint sum is  sum_i mix(bits_i XOR (i * GOLDEN))  over a tensor's elements in
// row-major order, wrapping modulo 2^64. Addition modulo 2^64 is associative and commutative,
// so any chunking, thread count, reduction order or atomics give the same value, on CPU and
// CUDA alike. Mixing the position into each term makes swapped elements change the sum, and
// the term is a bijection of the element's bits, so a single flipped bit always changes it.
//
// The dtype and shape are folded in afterwards, in Python (replay/fingerprinting.py), so that the
// kernels only deal with raw element bits.
#pragma once

#include "common.h"

namespace replay {
namespace kernels {

constexpr uint64_t kFingerprintGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kFingerprintMul = 0xD6E8FEB86659FD93ULL;

// The term element `index` with raw bits `bits` (zero-extended to 64 bits) adds to the sum:
// xor-shift, odd multiply, xor-shift, each a bijection of 64-bit words, so a flipped bit always
// changes the term. The first xor-shift matters: a multiply only carries changes upwards, so
// without it a flip of a high bit (the sign of a float64) would change every term by one of a
// handful of values, and two such flips could cancel in the sum. One multiply (not the two of
// a full mixer) because the optimizer kernels hash three or four tensors per element in the
// same pass and the multiply is what costs.
REPLAY_HD uint64_t fingerprint_term(uint64_t bits, uint64_t index) {
  uint64_t x = bits ^ (index * kFingerprintGolden);
  x ^= x >> 32;
  const uint64_t y = x * kFingerprintMul;
  return y ^ (y >> 32);
}

REPLAY_HD uint64_t float_bits(float x) { return static_cast<uint64_t>(bits_of(x)); }

}  // namespace kernels
}  // namespace replay
