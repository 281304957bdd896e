// CPU loop scaffolding shared by the replay CPU kernels: work units over a list of tensors,
// per-instruction-set variants of the hot loops, and order-independent fingerprint totals.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace replay {
namespace cpu {

// Elements per work unit handed to at::parallel_for. A fixed size (not derived from the thread
// count) keeps the decomposition the same everywhere; the results would not change anyway,
// since every element is computed on its own and fingerprint totals are order-independent.
constexpr int64_t kUnitElements = int64_t{1} << 15;

// Elements per inner block: small enough that a block's scratch buffers stay in L1.
constexpr int64_t kBlockElements = 1024;

struct WorkUnit {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<WorkUnit> make_units(const std::vector<int64_t>& numels) {
  std::vector<WorkUnit> units;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kUnitElements) {
      units.push_back({t, b, std::min(numels[t], b + kUnitElements)});
    }
  }
  return units;
}

// Wrapping 64-bit sums, one per (tensor, slot), filled concurrently by the work units.
class FingerprintTotals {
 public:
  FingerprintTotals(int64_t tensors, int64_t slots)
      : slots_(slots), sums_(static_cast<size_t>(tensors * slots)) {
    for (auto& s : sums_) s.store(0, std::memory_order_relaxed);
  }
  void add(int64_t tensor, int64_t slot, uint64_t value) {
    sums_[static_cast<size_t>(tensor * slots_ + slot)].fetch_add(value, std::memory_order_relaxed);
  }
  // Copies the totals into an int64 buffer of shape [tensors, slots] (bits reinterpreted).
  void write_to(int64_t* out) const {
    for (size_t i = 0; i < sums_.size(); ++i) {
      out[i] = static_cast<int64_t>(sums_[i].load(std::memory_order_relaxed));
    }
  }

 private:
  int64_t slots_;
  std::vector<std::atomic<uint64_t>> sums_;
};

// Below this many elements in all, a call runs on the calling thread: waking the thread pool
// costs more than the work (a model's biases and BatchNorm buffers), and on a busy machine its
// barrier waits for a descheduled thread. The results are the same either way.
constexpr int64_t kSerialElements = int64_t{1} << 16;

// While alive (and `active`), the calling thread computes with IEEE subnormals: its x86
// flush-to-zero (FTZ) and denormals-are-zero (DAZ) bits, which torch.set_flush_denormal(True)
// sets, are cleared, and restored afterwards. The portable contract promises CUDA's bits, and
// CUDA computes float32 with subnormals (replay's kernels are not built with -ftz); under FTZ/DAZ
// a subnormal input or result would round differently. Each thread has its own MXCSR, so the
// guard is taken on every thread that runs a unit. (Other architectures: not handled yet; the
// flags are x86's.)
class IeeeSubnormals {
 public:
  explicit IeeeSubnormals(bool active) {
#if defined(__x86_64__) || defined(_M_X64)
    if (active) {
      saved_ = _mm_getcsr();
      changed_ = (saved_ & kFlushBits) != 0;
      if (changed_) _mm_setcsr(saved_ & ~kFlushBits);
    }
#else
    (void)active;
#endif
  }
  ~IeeeSubnormals() {
#if defined(__x86_64__) || defined(_M_X64)
    if (changed_) _mm_setcsr(saved_);
#endif
  }
  IeeeSubnormals(const IeeeSubnormals&) = delete;
  IeeeSubnormals& operator=(const IeeeSubnormals&) = delete;

 private:
  static constexpr unsigned kFlushBits = 0x8040u;  // FTZ (bit 15) | DAZ (bit 6)
  unsigned saved_ = 0;
  bool changed_ = false;
};

// Runs fn(unit) for every unit, in parallel on torch's intra-op thread pool (serially when the
// units hold little work); with `ieee_subnormals`, every thread that runs units does so with
// FTZ/DAZ cleared (IeeeSubnormals).
template <typename Fn>
void parallel_units(const std::vector<WorkUnit>& units, const Fn& fn, bool ieee_subnormals = false) {
  int64_t total = 0;
  for (const auto& u : units) total += u.end - u.begin;
  if (total <= kSerialElements) {
    IeeeSubnormals guard(ieee_subnormals);
    for (const auto& u : units) fn(u);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    IeeeSubnormals guard(ieee_subnormals);
    for (int64_t u = begin; u < end; ++u) fn(units[static_cast<size_t>(u)]);
  });
}

// Instruction sets the hot loops are compiled for. The bits are identical on every path
// (the source fixes every rounding and every FMA); only the speed differs.
enum class Isa { kBaseline, kAvx2, kAvx512 };

inline Isa best_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("fma")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

}  // namespace cpu
}  // namespace replay

// Defines NAME(...) that calls NAME##_impl(...) (an always-inline template or function in the
// including file) compiled three times: for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and
// the baseline, choosing one at run time from the CPU's features.
#if defined(__x86_64__) && defined(__GNUC__)
#define REPLAY_CPU_MULTIVERSION(NAME, PARAMS, ARGS)                                          \
  __attribute__((target("arch=x86-64-v4"))) static void NAME##_v4 PARAMS { NAME##_impl ARGS; } \
  __attribute__((target("arch=x86-64-v3"))) static void NAME##_v3 PARAMS { NAME##_impl ARGS; } \
  static void NAME##_base PARAMS { NAME##_impl ARGS; }                                        \
  static void NAME PARAMS {                                                                  \
    switch (::replay::cpu::best_isa()) {                                                     \
      case ::replay::cpu::Isa::kAvx512: NAME##_v4 ARGS; return;                              \
      case ::replay::cpu::Isa::kAvx2: NAME##_v3 ARGS; return;                                \
      default: NAME##_base ARGS; return;                                                     \
    }                                                                                        \
  }
#else
#define REPLAY_CPU_MULTIVERSION(NAME, PARAMS, ARGS) \
  static void NAME PARAMS { NAME##_impl ARGS; }
#endif
