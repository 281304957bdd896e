// CUDA implementations of the replay ops (schemas in csrc/ops.cpp): argument checks, raw
// pointers gathered into host arrays, one torch-free launcher call (csrc/cuda/launch.h).
//
// Only portable numerics exist here. numerics='torch' reproduces torch.optim's *CPU* path
// (MKL's vector sqrt, FMA placement of the CPU dispatch); torch's own CUDA optimizers use yet
// another arithmetic (shared/notes/numerics.md), so there is nothing on CUDA for it to match.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// The current stream from c10 directly: at::cuda::getCurrentCUDAStream is this same function,
// but its header (ATen/cuda/CUDAContext.h) also pulls in cuBLAS/cuSPARSE/cuSOLVER headers,
// which a bare CUDA toolkit (nvcc + runtime) does not have and these kernels do not need.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "../checks.h"
#include "../numerics.h"
#include "launch.h"

namespace replay {
namespace cuda {
namespace {

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

void check_portable(int64_t numerics, const char* op) {
  TORCH_CHECK(checked_numerics(numerics, op) == Numerics::kPortable, op,
              ": numerics='torch' is a CPU-only mode: torch's own CUDA optimizers use a "
              "different arithmetic; use numerics='portable' on CUDA");
}

// check_float_list checks the device type; one kernel launch also needs one device.
void check_same_device(const char* op, const char* what, at::TensorList list,
                       const c10::Device& device) {
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].device() == device, op, ": ", what, "[", i, "] is on ", list[i].device(),
                ", expected ", device, " (all tensors of one call must be on one device)");
  }
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::vector<int64_t> numels_of(at::TensorList tensors) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const auto& t : tensors) numels.push_back(t.numel());
  return numels;
}

std::vector<float*> float_ptrs(at::TensorList tensors) {
  std::vector<float*> ptrs;
  ptrs.reserve(tensors.size());
  for (const auto& t : tensors) ptrs.push_back(t.data_ptr<float>());
  return ptrs;
}

std::vector<const float*> const_float_ptrs(at::TensorList tensors) {
  std::vector<const float*> ptrs;
  ptrs.reserve(tensors.size());
  for (const auto& t : tensors) ptrs.push_back(t.data_ptr<float>());
  return ptrs;
}

// Zeroed int64 fingerprint sums of shape `sizes` on `device`, and the same memory as the
// unsigned 64-bit words the kernels add to (wrapping sums; the bits are the int64 result).
at::Tensor zero_sums(at::IntArrayRef sizes, const c10::Device& device) {
  return at::zeros(sizes, at::TensorOptions().dtype(at::kLong).device(device));
}
unsigned long long* sum_words(const at::Tensor& sums) {
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "64-bit sums");
  return reinterpret_cast<unsigned long long*>(sums.data_ptr<int64_t>());
}

at::Tensor fingerprint_sums_cuda(at::TensorList tensors) {
  const char* op = "replay::fingerprint_sums";
  TORCH_CHECK(!tensors.empty(), op, ": no tensors (an empty list never reaches the CUDA kernel)");
  const c10::Device device = tensors[0].device();
  std::vector<const void*> data;
  std::vector<int64_t> element_sizes;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& x = tensors[t];
    TORCH_CHECK(x.device() == device, op, ": tensor ", t, " is on ", x.device(), ", tensor 0 on ",
                device, "; all tensors of one call must be on one device");
    TORCH_CHECK(x.is_contiguous(), op, ": tensor ", t,
                " is not contiguous (replay.fingerprint makes views contiguous first)");
    const int64_t es = x.element_size();
    TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8, op, ": tensor ", t, " has dtype ",
                x.scalar_type(), " with ", es,
                "-byte elements; reinterpret it as 1, 2, 4 or 8-byte integers first");
    data.push_back(x.data_ptr());
    element_sizes.push_back(es);
  }
  const c10::cuda::CUDAGuard guard(device);
  const int64_t n = static_cast<int64_t>(tensors.size());
  at::Tensor sums = zero_sums({n}, device);
  const std::vector<int64_t> numels = numels_of(tensors);
  C10_CUDA_CHECK(launch_fingerprint_sums(n, data.data(), numels.data(), element_sizes.data(),
                                         sum_words(sums), current_stream()));
  return sums;
}

// The zeroed [n, slots] sums of a step, or with fingerprint=false the [n, 0] result the schema
// promises; step_sum_words gives the kernels nullptr then, and they skip the hashing.
at::Tensor step_sums(bool fingerprint, int64_t n, int64_t slots, const c10::Device& device) {
  return zero_sums({n, fingerprint ? slots : 0}, device);
}
unsigned long long* step_sum_words(bool fingerprint, const at::Tensor& sums) {
  return fingerprint ? sum_words(sums) : nullptr;
}

at::Tensor sgd_step_cuda(at::TensorList params, at::TensorList grads,
                         at::TensorList momentum_buffers, at::IntArrayRef first_step,
                         double weight_decay, double momentum, double one_minus_dampening,
                         double neg_lr, bool nesterov, bool maximize, bool fingerprint,
                         int64_t numerics) {
  const char* op = "replay::sgd_step_";
  check_portable(numerics, op);
  const bool has_momentum = momentum != 0.0;
  check_sgd_args(op, params, grads, momentum_buffers, first_step, has_momentum, kCUDA);
  TORCH_CHECK(!params.empty(), op, ": no params");
  const c10::Device device = params[0].device();
  check_same_device(op, "params", params, device);
  check_same_device(op, "grads", grads, device);
  check_same_device(op, "momentum_buffers", momentum_buffers, device);

  const kernels::SgdScalars scalars = kernels::make_sgd_scalars(
      weight_decay, momentum, one_minus_dampening, neg_lr, nesterov, maximize);
  const c10::cuda::CUDAGuard guard(device);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor sums = step_sums(fingerprint, n, has_momentum ? 2 : 1, device);
  const std::vector<int64_t> numels = numels_of(params);
  const std::vector<float*> param_ptrs = float_ptrs(params);
  const std::vector<const float*> grad_ptrs = const_float_ptrs(grads);
  const std::vector<float*> buffer_ptrs = float_ptrs(momentum_buffers);
  // std::vector<bool> has no data(): one byte per flag.
  const std::unique_ptr<bool[]> first(new bool[params.size()]);
  for (size_t t = 0; t < params.size(); ++t) first[t] = has_momentum && first_step[t] != 0;
  const SgdTensors tensors{n, numels.data(), param_ptrs.data(), grad_ptrs.data(),
                           has_momentum ? buffer_ptrs.data() : nullptr, first.get()};
  C10_CUDA_CHECK(launch_sgd_step(tensors, scalars, step_sum_words(fingerprint, sums),
                                 current_stream()));
  return sums;
}

at::Tensor adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                          at::ArrayRef<double> neg_step_sizes,
                          at::ArrayRef<double> bias_correction2_sqrts, double lerp_weight,
                          double beta2, double one_minus_beta2, double eps, double weight_decay,
                          double decay_factor, bool decoupled, bool amsgrad, bool maximize,
                          bool fingerprint, int64_t numerics) {
  const char* op = "replay::adam_step_";
  check_portable(numerics, op);
  check_adam_args(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, neg_step_sizes,
                  bias_correction2_sqrts, amsgrad, kCUDA);
  TORCH_CHECK(!params.empty(), op, ": no params");
  const c10::Device device = params[0].device();
  check_same_device(op, "params", params, device);
  check_same_device(op, "grads", grads, device);
  check_same_device(op, "exp_avgs", exp_avgs, device);
  check_same_device(op, "exp_avg_sqs", exp_avg_sqs, device);
  check_same_device(op, "max_exp_avg_sqs", max_exp_avg_sqs, device);

  const kernels::AdamScalars scalars =
      kernels::make_adam_scalars(lerp_weight, beta2, one_minus_beta2, eps, weight_decay,
                                 decay_factor, decoupled, amsgrad, maximize);
  // Per-tensor scalars rounded to float once, as on CPU.
  std::vector<float> step_sizes, bc2_sqrts;
  for (size_t t = 0; t < params.size(); ++t) {
    step_sizes.push_back(static_cast<float>(neg_step_sizes[t]));
    bc2_sqrts.push_back(static_cast<float>(bias_correction2_sqrts[t]));
  }
  const c10::cuda::CUDAGuard guard(device);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor sums = step_sums(fingerprint, n, amsgrad ? 4 : 3, device);
  const std::vector<int64_t> numels = numels_of(params);
  const std::vector<float*> param_ptrs = float_ptrs(params);
  const std::vector<const float*> grad_ptrs = const_float_ptrs(grads);
  const std::vector<float*> exp_avg_ptrs = float_ptrs(exp_avgs);
  const std::vector<float*> exp_avg_sq_ptrs = float_ptrs(exp_avg_sqs);
  const std::vector<float*> max_ptrs = float_ptrs(max_exp_avg_sqs);
  const AdamTensors tensors{n,
                            numels.data(),
                            param_ptrs.data(),
                            grad_ptrs.data(),
                            exp_avg_ptrs.data(),
                            exp_avg_sq_ptrs.data(),
                            amsgrad ? max_ptrs.data() : nullptr,
                            step_sizes.data(),
                            bc2_sqrts.data()};
  C10_CUDA_CHECK(launch_adam_step(tensors, scalars, step_sum_words(fingerprint, sums),
                                  current_stream()));
  return sums;
}

at::Tensor ema_update_cuda(at::TensorList averages, at::TensorList sources, double weight,
                           bool fingerprint) {
  const char* op = "replay::ema_update_";
  check_float_list(op, "averages", averages, averages, kCUDA);
  check_float_list(op, "sources", sources, averages, kCUDA);
  TORCH_CHECK(!averages.empty(), op, ": no averages");
  const c10::Device device = averages[0].device();
  check_same_device(op, "averages", averages, device);
  check_same_device(op, "sources", sources, device);

  const c10::cuda::CUDAGuard guard(device);
  const int64_t n = static_cast<int64_t>(averages.size());
  at::Tensor sums = step_sums(fingerprint, n, 1, device);
  const std::vector<int64_t> numels = numels_of(averages);
  const std::vector<float*> average_ptrs = float_ptrs(averages);
  const std::vector<const float*> source_ptrs = const_float_ptrs(sources);
  C10_CUDA_CHECK(launch_ema_update(n, numels.data(), average_ptrs.data(), source_ptrs.data(),
                                   static_cast<float>(weight), step_sum_words(fingerprint, sums),
                                   current_stream()));
  return sums;
}

void bandwidth_yardstick_cuda(at::TensorList params, at::TensorList grads,
                              at::TensorList exp_avgs, at::TensorList exp_avg_sqs) {
  const char* op = "replay::bandwidth_yardstick_";
  check_float_list(op, "params", params, params, kCUDA);
  check_float_list(op, "grads", grads, params, kCUDA);
  check_float_list(op, "exp_avgs", exp_avgs, params, kCUDA);
  check_float_list(op, "exp_avg_sqs", exp_avg_sqs, params, kCUDA);
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  check_same_device(op, "params", params, device);
  check_same_device(op, "grads", grads, device);
  check_same_device(op, "exp_avgs", exp_avgs, device);
  check_same_device(op, "exp_avg_sqs", exp_avg_sqs, device);

  const c10::cuda::CUDAGuard guard(device);
  const std::vector<int64_t> numels = numels_of(params);
  const std::vector<float*> param_ptrs = float_ptrs(params);
  const std::vector<const float*> grad_ptrs = const_float_ptrs(grads);
  const std::vector<float*> exp_avg_ptrs = float_ptrs(exp_avgs);
  const std::vector<float*> exp_avg_sq_ptrs = float_ptrs(exp_avg_sqs);
  C10_CUDA_CHECK(launch_bandwidth_yardstick(
      static_cast<int64_t>(params.size()), numels.data(), param_ptrs.data(), grad_ptrs.data(),
      exp_avg_ptrs.data(), exp_avg_sq_ptrs.data(), current_stream()));
}

}  // namespace
}  // namespace cuda
}  // namespace replay

TORCH_LIBRARY_IMPL(replay, CUDA, m) {
  m.impl("fingerprint_sums", &replay::cuda::fingerprint_sums_cuda);
  m.impl("sgd_step_", &replay::cuda::sgd_step_cuda);
  m.impl("adam_step_", &replay::cuda::adam_step_cuda);
  m.impl("ema_update_", &replay::cuda::ema_update_cuda);
  m.impl("bandwidth_yardstick_", &replay::cuda::bandwidth_yardstick_cuda);
}
