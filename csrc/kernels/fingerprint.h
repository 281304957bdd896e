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

// The term an element adds to the sum, from its raw bits and its index: an odd multiply and an
// xor-shift, both bijections of 64-bit words, so a flipped bit always changes the term. One
// multiply, not the two of a full mixer, because the optimizer kernels hash three or four
// tensors per element in the same pass and the multiply is what costs.
//
// Words of 1, 2 or 4 bytes: their bits sit below the multiply's low 32 bits, whose changes the
// multiply spreads over the whole product before the final xor-shift folds it back down.
//
// The *_at variants take index * kFingerprintGolden (mod 2^64) instead of the index: a CPU loop
// carries it as an induction variable, one add per element where a 64-bit multiply would cost
// as much as the term's own (x86 has no cheap vector 64-bit multiply). Same values.
REPLAY_HD uint64_t fingerprint_term32_at(uint32_t bits, uint64_t index_golden) {
  const uint64_t y = (static_cast<uint64_t>(bits) ^ index_golden) * kFingerprintMul;
  return y ^ (y >> 32);
}

REPLAY_HD uint64_t fingerprint_term32(uint32_t bits, uint64_t index) {
  return fingerprint_term32_at(bits, index * kFingerprintGolden);
}

// 8-byte words need one more xor-shift first: a multiply only carries changes upwards, so a
// flip of a high bit (the sign of a float64) would otherwise change the term by one of a
// handful of values, and two such flips could cancel in the sum.
REPLAY_HD uint64_t fingerprint_term64_at(uint64_t bits, uint64_t index_golden) {
  uint64_t x = bits ^ index_golden;
  x ^= x >> 32;
  const uint64_t y = x * kFingerprintMul;
  return y ^ (y >> 32);
}

REPLAY_HD uint64_t fingerprint_term64(uint64_t bits, uint64_t index) {
  return fingerprint_term64_at(bits, index * kFingerprintGolden);
}

// The term of a word of any supported width (uint8_t, uint16_t, uint32_t or uint64_t), from
// index * kFingerprintGolden (the _at form) or from the index.
template <typename Word>
REPLAY_HD uint64_t fingerprint_word_term_at(Word bits, uint64_t index_golden) {
  if constexpr (sizeof(Word) == 8) {
    return fingerprint_term64_at(static_cast<uint64_t>(bits), index_golden);
  } else {
    return fingerprint_term32_at(static_cast<uint32_t>(bits), index_golden);
  }
}

template <typename Word>
REPLAY_HD uint64_t fingerprint_word_term(Word bits, uint64_t index) {
  return fingerprint_word_term_at(bits, index * kFingerprintGolden);
}

// The term of a float32 element (what the optimizer and EMA kernels add for what they write).
REPLAY_HD uint64_t float_term(float x, uint64_t index) { return fingerprint_term32(bits_of(x), index); }
REPLAY_HD uint64_t float_term_at(float x, uint64_t index_golden) {
  return fingerprint_term32_at(bits_of(x), index_golden);
}

}  // namespace kernels
}  // namespace replay
