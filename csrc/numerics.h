// The numerics an optimizer op is asked for (the `numerics` integer in the op schemas).
// replay/_numerics.py holds the same table and decides which one a Python call gets.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace replay {

enum class Numerics : int64_t {
  // shared/notes/numerics.md's portable recipe: FMA exactly at its sites, IEEE sqrt and division.
  // The same bits on CPU and CUDA.
  kPortable = 0,
  // torch.optim's CPU single-tensor path under an FMA-capable dispatch (AVX2, AVX-512):
  // FMA at the same sites, and torch's own vector sqrt (MKL vmsSqrt).
  kTorchFma = 1,
  // torch.optim's CPU single-tensor path under ATEN_CPU_CAPABILITY=default: no FMA anywhere,
  // and torch's own vector sqrt.
  kTorchNoFma = 2,
};

inline Numerics checked_numerics(int64_t value, const char* op) {
  TORCH_CHECK(value >= 0 && value <= 2, op, ": numerics must be 0 (portable), 1 (torch, FMA) or ",
              "2 (torch, no FMA); got ", value);
  return static_cast<Numerics>(value);
}

}  // namespace replay
