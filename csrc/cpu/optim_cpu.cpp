// CPU SGD, Adam/AdamW and EMA steps: loops over the arithmetic in csrc/kernels/, fingerprints
// of everything written computed in the same pass.
#include <ATen/ATen.h>

#include "../checks.h"
#include "../kernels/adam.h"
#include "../kernels/ema.h"
#include "../kernels/fingerprint.h"
#include "../kernels/sgd.h"
#include "../numerics.h"
#include "loops.h"
#include "ops_cpu.h"

// torch's vector square root on x86 (MKL VML). libtorch_cpu exports it when torch was built
// with MKL; the weak declaration lets the extension load without it, and torch numerics then
// refuse to run (see mkl_sqrt_available) instead of producing different bits.
extern "C" __attribute__((weak)) void vmsSqrt(int n, const float* a, float* r, long long mode);

namespace replay {
namespace cpu {
namespace {

// The mode torch's ATen/cpu/vml.h passes: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
constexpr long long kTorchVmlMode = 0x00000002LL | 0x00140000LL | 0x00000100LL;

using kernels::float_term_at;
using kernels::kFingerprintGolden;

#define REPLAY_ALWAYS_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------- SGD ----

struct SgdRange {
  float* param;
  const float* grad;
  float* buffer;  // nullptr without momentum
  uint32_t first_step_mask;
  int64_t begin, end;
  uint64_t* sums;  // [2]: param, buffer
};

// kCanonicalNan: portable numerics store one NaN (kernels::canonical_nan), torch numerics
// whatever torch's arithmetic leaves.
template <bool kFused, bool kCanonicalNan, bool kHash>
REPLAY_ALWAYS_INLINE void sgd_range_typed(const SgdRange& r, const kernels::SgdScalars& scalars) {
  // A local copy, as in adam_range_typed; has_momentum is fixed per loop below so that the
  // branch on it folds away.
  kernels::SgdScalars s = scalars;
  uint64_t fp_param = 0, fp_buffer = 0;
  // i * GOLDEN carried as an induction variable (see fingerprint_term32_at).
  uint64_t ig = static_cast<uint64_t>(r.begin) * kFingerprintGolden;
  if (scalars.has_momentum) {
    s.has_momentum = true;
    for (int64_t i = r.begin; i < r.end; ++i) {
      float p = r.param[i], b = r.buffer[i];
      kernels::sgd_element<kFused>(p, r.grad[i], b, r.first_step_mask, s);
      if (kCanonicalNan) {
        p = kernels::canonical_nan(p);
        b = kernels::canonical_nan(b);
      }
      r.param[i] = p;
      r.buffer[i] = b;
      if (kHash) {
        fp_param += float_term_at(p, ig);
        fp_buffer += float_term_at(b, ig);
        ig += kFingerprintGolden;
      }
    }
  } else {
    s.has_momentum = false;
    float unused = 0.0f;
    for (int64_t i = r.begin; i < r.end; ++i) {
      float p = r.param[i];
      kernels::sgd_element<kFused>(p, r.grad[i], unused, 0u, s);
      if (kCanonicalNan) p = kernels::canonical_nan(p);
      r.param[i] = p;
      if (kHash) {
        fp_param += float_term_at(p, ig);
        ig += kFingerprintGolden;
      }
    }
  }
  r.sums[0] = fp_param;
  r.sums[1] = fp_buffer;
}

REPLAY_ALWAYS_INLINE void sgd_range_impl(const SgdRange& r, const kernels::SgdScalars& s,
                                         Numerics numerics, bool hash) {
  switch (numerics) {
    case Numerics::kPortable:
      return hash ? sgd_range_typed<true, true, true>(r, s) : sgd_range_typed<true, true, false>(r, s);
    case Numerics::kTorchFma:
      return hash ? sgd_range_typed<true, false, true>(r, s) : sgd_range_typed<true, false, false>(r, s);
    case Numerics::kTorchNoFma:
      return hash ? sgd_range_typed<false, false, true>(r, s) : sgd_range_typed<false, false, false>(r, s);
  }
}
REPLAY_CPU_MULTIVERSION(sgd_range,
                        (const SgdRange& r, const kernels::SgdScalars& s, Numerics numerics, bool hash),
                        (r, s, numerics, hash))

// --------------------------------------------------------------------------------- Adam ----

struct AdamRange {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // nullptr without amsgrad
  float neg_step_size;
  float bias_correction2_sqrt;
  int64_t begin, end;
  uint64_t* sums;  // [4]: param, exp_avg, exp_avg_sq, max_exp_avg_sq
};

template <bool kFused, bool kTorchSqrt, bool kAmsgrad, bool kHash>
REPLAY_ALWAYS_INLINE void adam_range_typed(const AdamRange& r, const kernels::AdamScalars& scalars) {
  // Local copies: the stores below could alias the referenced structs as far as the compiler
  // knows, which would keep it from hoisting the flags and vectorizing the loops.
  const kernels::AdamScalars s = scalars;
  const float neg_step_size = r.neg_step_size;
  const float bias_correction2_sqrt = r.bias_correction2_sqrt;
  uint64_t fp[4] = {0, 0, 0, 0};
  // Called once per element, in index order from r.begin: i * GOLDEN is carried as an
  // induction variable (see fingerprint_term32_at).
  uint64_t ig = static_cast<uint64_t>(r.begin) * kFingerprintGolden;
  auto hash = [&](float pj, float mj, float vj, float vmaxj) {
    if (!kHash) return;
    fp[0] += float_term_at(pj, ig);
    fp[1] += float_term_at(mj, ig);
    fp[2] += float_term_at(vj, ig);
    if (kAmsgrad) fp[3] += float_term_at(vmaxj, ig);
    ig += kFingerprintGolden;
  };
  if constexpr (!kTorchSqrt) {
    // Portable numerics: one loop, IEEE sqrt in line (vsqrtps), one NaN stored.
    float* __restrict__ p = r.param;
    const float* __restrict__ g = r.grad;
    float* __restrict__ m = r.exp_avg;
    float* __restrict__ v = r.exp_avg_sq;
    float* __restrict__ vmax = r.max_exp_avg_sq;
    for (int64_t i = r.begin; i < r.end; ++i) {
      float pi = p[i], mi = m[i], vi = v[i], vmaxi = kAmsgrad ? vmax[i] : 0.0f;
      const float radicand = kernels::adam_moments<kFused>(pi, g[i], mi, vi, vmaxi, s);
      pi = kernels::canonical_nan(kernels::adam_param(pi, mi, std::sqrt(radicand), neg_step_size,
                                                      bias_correction2_sqrt, s.eps));
      mi = kernels::canonical_nan(mi);
      vi = kernels::canonical_nan(vi);
      if (kAmsgrad) vmaxi = kernels::canonical_nan(vmaxi);
      p[i] = pi;
      m[i] = mi;
      v[i] = vi;
      if (kAmsgrad) vmax[i] = vmaxi;
      hash(pi, mi, vi, vmaxi);
    }
  } else {
    // Torch numerics: torch's vector sqrt is a library call, so the step runs in blocks that
    // stay in L1: moments for the block, square roots of the block, then the parameters.
    float radicand[kBlockElements];
    float root[kBlockElements];
    for (int64_t block = r.begin; block < r.end; block += kBlockElements) {
      const int64_t n = std::min(kBlockElements, r.end - block);
      float* __restrict__ p = r.param + block;
      const float* __restrict__ g = r.grad + block;
      float* __restrict__ m = r.exp_avg + block;
      float* __restrict__ v = r.exp_avg_sq + block;
      float* __restrict__ vmax = kAmsgrad ? r.max_exp_avg_sq + block : nullptr;
      // Moments (and AdamW's decay, stored back into the parameter for the last loop).
      for (int64_t j = 0; j < n; ++j) {
        float pj = p[j], mj = m[j], vj = v[j], vmaxj = kAmsgrad ? vmax[j] : 0.0f;
        radicand[j] = kernels::adam_moments<kFused>(pj, g[j], mj, vj, vmaxj, s);
        p[j] = pj;
        m[j] = mj;
        v[j] = vj;
        if (kAmsgrad) vmax[j] = vmaxj;
      }
      vmsSqrt(static_cast<int>(n), radicand, root, kTorchVmlMode);
      for (int64_t j = 0; j < n; ++j) {
        const float pj = kernels::adam_param(p[j], m[j], root[j], neg_step_size,
                                             bias_correction2_sqrt, s.eps);
        p[j] = pj;
        hash(pj, m[j], v[j], kAmsgrad ? vmax[j] : 0.0f);
      }
    }
  }
  for (int k = 0; k < 4; ++k) r.sums[k] = fp[k];
}

template <bool kFused, bool kTorchSqrt>
REPLAY_ALWAYS_INLINE void adam_range_amsgrad(const AdamRange& r, const kernels::AdamScalars& s,
                                             bool amsgrad, bool hash) {
  if (amsgrad) {
    hash ? adam_range_typed<kFused, kTorchSqrt, true, true>(r, s)
         : adam_range_typed<kFused, kTorchSqrt, true, false>(r, s);
  } else {
    hash ? adam_range_typed<kFused, kTorchSqrt, false, true>(r, s)
         : adam_range_typed<kFused, kTorchSqrt, false, false>(r, s);
  }
}

REPLAY_ALWAYS_INLINE void adam_range_impl(const AdamRange& r, const kernels::AdamScalars& s,
                                          Numerics numerics, bool amsgrad, bool hash) {
  switch (numerics) {
    case Numerics::kPortable: return adam_range_amsgrad<true, false>(r, s, amsgrad, hash);
    case Numerics::kTorchFma: return adam_range_amsgrad<true, true>(r, s, amsgrad, hash);
    case Numerics::kTorchNoFma: return adam_range_amsgrad<false, true>(r, s, amsgrad, hash);
  }
}
REPLAY_CPU_MULTIVERSION(adam_range,
                        (const AdamRange& r, const kernels::AdamScalars& s, Numerics numerics,
                         bool amsgrad, bool hash),
                        (r, s, numerics, amsgrad, hash))

// ---------------------------------------------------------------------------------- EMA ----

REPLAY_ALWAYS_INLINE void ema_range_impl(float* average, const float* source,
                                         const kernels::LerpWeight& weight, bool hash,
                                         int64_t begin, int64_t end, uint64_t* sum) {
  const kernels::LerpWeight w = weight;  // a local copy, as in adam_range_typed
  uint64_t fp = 0;
  uint64_t ig = static_cast<uint64_t>(begin) * kFingerprintGolden;  // i * GOLDEN, carried
  for (int64_t i = begin; i < end; ++i) {
    const float a = kernels::canonical_nan(kernels::ema_element(average[i], source[i], w));
    average[i] = a;
    if (hash) fp += float_term_at(a, ig);
    ig += kFingerprintGolden;
  }
  *sum = fp;
}
REPLAY_CPU_MULTIVERSION(ema_range,
                        (float* average, const float* source, const kernels::LerpWeight& weight,
                         bool hash, int64_t begin, int64_t end, uint64_t* sum),
                        (average, source, weight, hash, begin, end, sum))

// ------------------------------------------------------------------- bandwidth yardstick ----

// Reads and writes exactly the bytes an Adam step does (p, g, m, v in; p, m, v out) with the
// least arithmetic: the memory-bandwidth ceiling a fused optimizer step is measured against.
REPLAY_ALWAYS_INLINE void yardstick_range_impl(float* __restrict__ p, const float* __restrict__ g,
                                               float* __restrict__ m, float* __restrict__ v,
                                               int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i];
    p[i] += gi;
    m[i] += gi;
    v[i] += gi;
  }
}
REPLAY_CPU_MULTIVERSION(yardstick_range,
                        (float* p, const float* g, float* m, float* v, int64_t begin, int64_t end),
                        (p, g, m, v, begin, end))

std::vector<int64_t> numels_of(at::TensorList tensors) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const auto& t : tensors) numels.push_back(t.numel());
  return numels;
}

at::Tensor totals_tensor(const FingerprintTotals& totals, int64_t tensors, int64_t slots) {
  at::Tensor out = at::empty({tensors, slots}, at::kLong);
  totals.write_to(out.data_ptr<int64_t>());
  return out;
}

void check_torch_sqrt(Numerics numerics) {
  TORCH_CHECK(numerics == Numerics::kPortable || vmsSqrt != nullptr,
              "replay: numerics='torch' needs the vector square root torch itself uses on this "
              "CPU (MKL's vmsSqrt), and this torch build does not export it; use "
              "numerics='portable'");
}

}  // namespace

at::Tensor sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        at::IntArrayRef first_step, double weight_decay, double momentum,
                        double one_minus_dampening, double neg_lr, bool nesterov, bool maximize,
                        bool fingerprint, int64_t numerics) {
  const char* op = "replay::sgd_step_";
  const Numerics mode = checked_numerics(numerics, op);
  const bool has_momentum = momentum != 0.0;
  check_sgd_args(op, params, grads, momentum_buffers, first_step, has_momentum, c10::DeviceType::CPU);
  const kernels::SgdScalars s = kernels::make_sgd_scalars(weight_decay, momentum,
                                                          one_minus_dampening, neg_lr, nesterov,
                                                          maximize);
  const int64_t n = static_cast<int64_t>(params.size());
  FingerprintTotals totals(n, 2);
  parallel_units(make_units(numels_of(params)), [&](const WorkUnit& u) {
    const size_t t = static_cast<size_t>(u.tensor);
    uint64_t sums[2];
    SgdRange r{params[t].data_ptr<float>(), grads[t].data_ptr<float>(),
               has_momentum ? momentum_buffers[t].data_ptr<float>() : nullptr,
               kernels::mask_of(has_momentum && first_step[t] != 0), u.begin, u.end, sums};
    sgd_range(r, s, mode, fingerprint);
    totals.add(u.tensor, 0, sums[0]);
    totals.add(u.tensor, 1, sums[1]);
  }, /*ieee_subnormals=*/mode == Numerics::kPortable);  // torch numerics: as torch computes
  return totals_tensor(totals, n, 2).narrow(1, 0, fingerprint ? (has_momentum ? 2 : 1) : 0).contiguous();
}

at::Tensor adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::ArrayRef<double> neg_step_sizes,
                         at::ArrayRef<double> bias_correction2_sqrts, double lerp_weight,
                         double beta2, double one_minus_beta2, double eps, double weight_decay,
                         double decay_factor, bool decoupled, bool amsgrad, bool maximize,
                         bool fingerprint, int64_t numerics) {
  const char* op = "replay::adam_step_";
  const Numerics mode = checked_numerics(numerics, op);
  check_torch_sqrt(mode);
  check_adam_args(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, neg_step_sizes,
                  bias_correction2_sqrts, amsgrad, c10::DeviceType::CPU);
  const kernels::AdamScalars s =
      kernels::make_adam_scalars(lerp_weight, beta2, one_minus_beta2, eps, weight_decay,
                                 decay_factor, decoupled, amsgrad, maximize);
  const int64_t n = static_cast<int64_t>(params.size());
  const int64_t slots = amsgrad ? 4 : 3;
  FingerprintTotals totals(n, 4);
  parallel_units(make_units(numels_of(params)), [&](const WorkUnit& u) {
    const size_t t = static_cast<size_t>(u.tensor);
    uint64_t sums[4];
    AdamRange r{params[t].data_ptr<float>(),
                grads[t].data_ptr<float>(),
                exp_avgs[t].data_ptr<float>(),
                exp_avg_sqs[t].data_ptr<float>(),
                amsgrad ? max_exp_avg_sqs[t].data_ptr<float>() : nullptr,
                static_cast<float>(neg_step_sizes[t]),
                static_cast<float>(bias_correction2_sqrts[t]),
                u.begin,
                u.end,
                sums};
    adam_range(r, s, mode, amsgrad, fingerprint);
    for (int64_t k = 0; k < slots; ++k) totals.add(u.tensor, k, sums[k]);
  }, /*ieee_subnormals=*/mode == Numerics::kPortable);  // torch numerics: as torch computes
  return totals_tensor(totals, n, 4).narrow(1, 0, fingerprint ? slots : 0).contiguous();
}

at::Tensor ema_update_cpu(at::TensorList averages, at::TensorList sources, double weight,
                          bool fingerprint) {
  const char* op = "replay::ema_update_";
  check_float_list(op, "averages", averages, averages, c10::DeviceType::CPU);
  check_float_list(op, "sources", sources, averages, c10::DeviceType::CPU);
  const kernels::LerpWeight w = kernels::make_lerp_weight(static_cast<float>(weight));
  const int64_t n = static_cast<int64_t>(averages.size());
  FingerprintTotals totals(n, 1);
  parallel_units(make_units(numels_of(averages)), [&](const WorkUnit& u) {
    const size_t t = static_cast<size_t>(u.tensor);
    uint64_t sum = 0;
    ema_range(averages[t].data_ptr<float>(), sources[t].data_ptr<float>(), w, fingerprint, u.begin,
              u.end, &sum);
    totals.add(u.tensor, 0, sum);
  }, /*ieee_subnormals=*/true);  // the EMA has one numerics: the portable one
  return totals_tensor(totals, n, 1).narrow(1, 0, fingerprint ? 1 : 0).contiguous();
}

void bandwidth_yardstick_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs) {
  const char* op = "replay::bandwidth_yardstick_";
  check_float_list(op, "params", params, params, c10::DeviceType::CPU);
  check_float_list(op, "grads", grads, params, c10::DeviceType::CPU);
  check_float_list(op, "exp_avgs", exp_avgs, params, c10::DeviceType::CPU);
  check_float_list(op, "exp_avg_sqs", exp_avg_sqs, params, c10::DeviceType::CPU);
  parallel_units(make_units(numels_of(params)), [&](const WorkUnit& u) {
    const size_t t = static_cast<size_t>(u.tensor);
    yardstick_range(params[t].data_ptr<float>(), grads[t].data_ptr<float>(),
                    exp_avgs[t].data_ptr<float>(), exp_avg_sqs[t].data_ptr<float>(), u.begin,
                    u.end);
  });
}

}  // namespace cpu
}  // namespace replay
