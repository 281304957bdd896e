// Torch-free launchers for the replay CUDA kernels (csrc/cuda/kernels.cu).
//
// The torch wrapper (ops_cuda.cpp) checks the tensors, gathers their raw pointers into host
// arrays and calls one launcher per op. Each launcher packs the tensors into multi-tensor
// batches (NVIDIA apex's multi_tensor_apply: one kernel launch covers many tensors, each block
// works on one chunk of one tensor) and launches as many batches as the list needs, all on
// `stream`. It returns the first launch error, or cudaSuccess.
//
// Fingerprint outputs are device arrays of wrapping 64-bit sums laid out as [count, slots]
// (row = tensor's position in the lists, column = which tensor of that row was written). They
// must be zeroed before the call: kernels only add to them, with atomics, which is exact and
// order-independent for integer sums (csrc/kernels/fingerprint.h). The step launchers take
// sums == nullptr for fingerprint=false: their kernels then skip the hashing altogether.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/adam.h"
#include "../kernels/sgd.h"

namespace replay {
namespace cuda {

// sums[t] += fingerprint_word_term(word_i, i) over the elements of tensor t, read as unsigned
// integers of element_sizes[t] bytes (1, 2, 4 or 8).
cudaError_t launch_fingerprint_sums(int64_t count, const void* const* data, const int64_t* numels,
                                    const int64_t* element_sizes, unsigned long long* sums,
                                    cudaStream_t stream);

struct SgdTensors {
  int64_t count;
  const int64_t* numels;
  float* const* params;
  const float* const* grads;
  float* const* momentum_buffers;  // ignored (may be nullptr) when !scalars.has_momentum
  const bool* first_step;          // one flag per tensor; ignored without momentum
};

// One SGD step per element (kernels::sgd_element<true>). sums: [count, 2] (param, buffer)
// with momentum, [count, 1] (param) without.
cudaError_t launch_sgd_step(const SgdTensors& tensors, const kernels::SgdScalars& scalars,
                            unsigned long long* sums, cudaStream_t stream);

struct AdamTensors {
  int64_t count;
  const int64_t* numels;
  float* const* params;
  const float* const* grads;
  float* const* exp_avgs;
  float* const* exp_avg_sqs;
  float* const* max_exp_avg_sqs;        // ignored (may be nullptr) without amsgrad
  const float* neg_step_sizes;          // per tensor: -lr / (1 - beta1^step)
  const float* bias_correction2_sqrts;  // per tensor: (1 - beta2^step) ** 0.5
};

// One Adam/AdamW step per element (adam_moments<true>, IEEE sqrt, adam_param). sums:
// [count, 4] (param, exp_avg, exp_avg_sq, max_exp_avg_sq) with amsgrad (scalars.amsgrad_mask),
// [count, 3] without.
cudaError_t launch_adam_step(const AdamTensors& tensors, const kernels::AdamScalars& scalars,
                             unsigned long long* sums, cudaStream_t stream);

// average = lerp(average, source, weight) per element (kernels::ema_element, with the weight
// prepared by kernels::make_lerp_weight). sums: [count, 1].
cudaError_t launch_ema_update(int64_t count, const int64_t* numels, float* const* averages,
                              const float* const* sources, float weight, unsigned long long* sums,
                              cudaStream_t stream);

// p += g, m += g, v += g: the bytes of an Adam step with almost no arithmetic (a bandwidth
// ceiling for benchmarks). No fingerprints.
cudaError_t launch_bandwidth_yardstick(int64_t count, const int64_t* numels, float* const* params,
                                       const float* const* grads, float* const* exp_avgs,
                                       float* const* exp_avg_sqs, cudaStream_t stream);

}  // namespace cuda
}  // namespace replay
