// The replay op catalogue: schemas (what each op reads and mutates) and the CPU implementations.
// CUDA implementations register themselves from csrc/cuda/ops_cuda.cpp when built with CUDA.
//
// Scalars arrive as doubles computed on the host exactly as torch.optim computes them
// (replay/_ops.py) and are rounded to float once inside each op.
//
// The optimizer and EMA ops return per-tensor fingerprint sums: int64 bits of the wrapping
// 64-bit sums of csrc/kernels/fingerprint.h, one column per tensor written, in schema order.
// With fingerprint=false they return a [n, 0] tensor and (on CPU) skip the hashing.
#include <Python.h>
#include <torch/library.h>

#include "cpu/ops_cpu.h"

extern "C" {
// `import replay._C` loads this shared object, which registers the ops below with the
// dispatcher; the Python module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(replay, m) {
  m.def("fingerprint_sums(Tensor[] tensors) -> Tensor");
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "int[] first_step, float weight_decay, float momentum, float one_minus_dampening, "
      "float neg_lr, bool nesterov, bool maximize, bool fingerprint, int numerics) -> Tensor");
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, float[] neg_step_sizes, "
      "float[] bias_correction2_sqrts, float lerp_weight, float beta2, float one_minus_beta2, "
      "float eps, float weight_decay, float decay_factor, bool decoupled, bool amsgrad, "
      "bool maximize, bool fingerprint, int numerics) -> Tensor");
  m.def(
      "ema_update_(Tensor(a!)[] averages, Tensor[] sources, float weight, bool fingerprint) "
      "-> Tensor");
  m.def(
      "bandwidth_yardstick_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs) -> ()");
}

TORCH_LIBRARY_IMPL(replay, CPU, m) {
  m.impl("fingerprint_sums", &replay::cpu::fingerprint_sums_cpu);
  m.impl("sgd_step_", &replay::cpu::sgd_step_cpu);
  m.impl("adam_step_", &replay::cpu::adam_step_cpu);
  m.impl("ema_update_", &replay::cpu::ema_update_cpu);
  m.impl("bandwidth_yardstick_", &replay::cpu::bandwidth_yardstick_cpu);
}
