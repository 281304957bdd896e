// CPU implementations of the replay ops (schemas in csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

namespace replay {
namespace cpu {

at::Tensor fingerprint_sums_cpu(at::TensorList tensors);

at::Tensor sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        at::IntArrayRef first_step, double weight_decay, double momentum,
                        double one_minus_dampening, double neg_lr, bool nesterov, bool maximize,
                        bool fingerprint, int64_t numerics);

at::Tensor adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::ArrayRef<double> neg_step_sizes,
                         at::ArrayRef<double> bias_correction2_sqrts, double lerp_weight,
                         double beta2, double one_minus_beta2, double eps, double weight_decay,
                         double decay_factor, bool decoupled, bool amsgrad, bool maximize,
                         bool fingerprint, int64_t numerics);

at::Tensor ema_update_cpu(at::TensorList averages, at::TensorList sources, double weight,
                          bool fingerprint);

void bandwidth_yardstick_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs);

}  // namespace cpu
}  // namespace replay
