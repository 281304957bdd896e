// Argument checks shared by the CPU and CUDA implementations of the replay ops. The Python
// layer checks first with friendlier messages; these keep direct torch.ops.replay calls safe.
#pragma once

#include <ATen/ATen.h>

namespace replay {

// Every tensor in `list` must be a contiguous float32 tensor on `device` with the same number
// of elements as the matching tensor in `like`, and `list` as long as `like`.
inline void check_float_list(const char* op, const char* what, at::TensorList list,
                             at::TensorList like, c10::DeviceType device) {
  TORCH_CHECK(list.size() == like.size(), op, ": expected ", like.size(), " tensors in ", what,
              ", got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& x = list[i];
    TORCH_CHECK(x.device().type() == device, op, ": ", what, "[", i, "] is on ", x.device(),
                ", expected ", c10::DeviceTypeName(device));
    TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": ", what, "[", i, "] has dtype ",
                x.scalar_type(), "; replay's kernels take float32 only");
    TORCH_CHECK(x.is_contiguous(), op, ": ", what, "[", i, "] is not contiguous");
    TORCH_CHECK(x.numel() == like[i].numel(), op, ": ", what, "[", i, "] has ", x.numel(),
                " elements, expected ", like[i].numel());
  }
}

// The list arguments of replay::sgd_step_ on `device`.
inline void check_sgd_args(const char* op, at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers, at::IntArrayRef first_step,
                           bool has_momentum, c10::DeviceType device) {
  check_float_list(op, "params", params, params, device);
  check_float_list(op, "grads", grads, params, device);
  if (has_momentum) {
    check_float_list(op, "momentum_buffers", momentum_buffers, params, device);
    TORCH_CHECK(first_step.size() == params.size(), op, ": first_step needs one flag per param");
  } else {
    TORCH_CHECK(momentum_buffers.empty(), op, ": momentum_buffers must be empty when momentum == 0");
  }
}

// The list arguments of replay::adam_step_ on `device`.
inline void check_adam_args(const char* op, at::TensorList params, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::ArrayRef<double> neg_step_sizes,
                            at::ArrayRef<double> bias_correction2_sqrts, bool amsgrad,
                            c10::DeviceType device) {
  check_float_list(op, "params", params, params, device);
  check_float_list(op, "grads", grads, params, device);
  check_float_list(op, "exp_avgs", exp_avgs, params, device);
  check_float_list(op, "exp_avg_sqs", exp_avg_sqs, params, device);
  if (amsgrad) {
    check_float_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, device);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty without amsgrad");
  }
  TORCH_CHECK(neg_step_sizes.size() == params.size() && bias_correction2_sqrts.size() == params.size(),
              op, ": neg_step_sizes and bias_correction2_sqrts need one value per param");
}

}  // namespace replay
