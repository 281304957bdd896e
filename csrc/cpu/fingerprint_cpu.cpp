// CPU fingerprint sums: the wrapping sum of fingerprint_word_term over each tensor's elements.
#include <ATen/ATen.h>

#include "../kernels/fingerprint.h"
#include "loops.h"
#include "ops_cpu.h"

namespace replay {
namespace cpu {
namespace {

template <typename Word>
inline __attribute__((always_inline)) void fingerprint_range_impl(const Word* data, int64_t begin,
                                                                  int64_t end, uint64_t* out) {
  uint64_t acc = 0;
  uint64_t index_golden = static_cast<uint64_t>(begin) * kernels::kFingerprintGolden;
  for (int64_t i = begin; i < end; ++i) {
    acc += kernels::fingerprint_word_term_at(data[i], index_golden);
    index_golden += kernels::kFingerprintGolden;  // (i + 1) * GOLDEN, without a multiply
  }
  *out = acc;
}

#define REPLAY_FINGERPRINT_WORD(NAME, WORD)                                                 \
  inline __attribute__((always_inline)) void NAME##_impl(const void* data, int64_t begin,   \
                                                         int64_t end, uint64_t* out) {      \
    fingerprint_range_impl(static_cast<const WORD*>(data), begin, end, out);                \
  }                                                                                         \
  REPLAY_CPU_MULTIVERSION(NAME, (const void* data, int64_t begin, int64_t end, uint64_t* out), \
                          (data, begin, end, out))

REPLAY_FINGERPRINT_WORD(fingerprint_range_u8, uint8_t)
REPLAY_FINGERPRINT_WORD(fingerprint_range_u16, uint16_t)
REPLAY_FINGERPRINT_WORD(fingerprint_range_u32, uint32_t)
REPLAY_FINGERPRINT_WORD(fingerprint_range_u64, uint64_t)

void fingerprint_range(int64_t element_size, const void* data, int64_t begin, int64_t end,
                       uint64_t* out) {
  switch (element_size) {
    case 1: return fingerprint_range_u8(data, begin, end, out);
    case 2: return fingerprint_range_u16(data, begin, end, out);
    case 4: return fingerprint_range_u32(data, begin, end, out);
    case 8: return fingerprint_range_u64(data, begin, end, out);
    default: TORCH_CHECK(false, "replay.fingerprint: unsupported element size ", element_size);
  }
}

}  // namespace

at::Tensor fingerprint_sums_cpu(at::TensorList tensors) {
  std::vector<int64_t> numels;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& x = tensors[t];
    TORCH_CHECK(x.device().is_cpu(), "replay::fingerprint_sums: tensor ", t, " is on ", x.device(),
                "; all tensors of one call must be on the CPU");
    TORCH_CHECK(x.is_contiguous(), "replay::fingerprint_sums: tensor ", t,
                " is not contiguous (replay.fingerprint makes views contiguous first)");
    const int64_t es = x.element_size();
    TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8, "replay::fingerprint_sums: tensor ", t,
                " has dtype ", x.scalar_type(), " with ", es,
                "-byte elements; reinterpret it as 1, 2, 4 or 8-byte integers first");
    numels.push_back(x.numel());
  }
  FingerprintTotals totals(static_cast<int64_t>(tensors.size()), 1);
  parallel_units(make_units(numels), [&](const WorkUnit& u) {
    uint64_t partial = 0;
    const auto& x = tensors[static_cast<size_t>(u.tensor)];
    fingerprint_range(x.element_size(), x.data_ptr(), u.begin, u.end, &partial);
    totals.add(u.tensor, 0, partial);
  });
  at::Tensor out = at::empty({static_cast<int64_t>(tensors.size())}, at::kLong);
  totals.write_to(out.data_ptr<int64_t>());
  return out;
}

}  // namespace cpu
}  // namespace replay
