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
#include "kernels/fingerprint.h"

#include <cstdint>
#include <vector>

namespace {

// The host-side finishing of fingerprints (replay/fingerprinting.py: _mix, finish and
// combine_state are the reference, and tests compare the two). A step finishes dozens of
// fingerprints; one call here costs less than a torch op call, and far less than mixing them in
// Python. Plain CPython functions on uint64 buffers, not dispatcher ops: they touch no tensor.
constexpr uint64_t kMul = replay::kernels::kFingerprintMul;
constexpr uint64_t kTensorTag = 0x7265706C61792D74ULL;  // "replay-t"
constexpr uint64_t kStateTag = 0x7265706C61792D73ULL;   // "replay-s"

uint64_t mix(uint64_t x) {
  x ^= x >> 32;
  x *= kMul;
  x ^= x >> 32;
  x *= kMul;
  x ^= x >> 32;
  return x;
}

bool read_words(PyObject* arg, Py_buffer* view, const uint64_t** words, Py_ssize_t* count) {
  if (PyObject_GetBuffer(arg, view, PyBUF_SIMPLE) != 0) return false;
  if (view->len % 8 != 0) {
    PyBuffer_Release(view);
    PyErr_SetString(PyExc_ValueError, "expected a buffer of 64-bit words");
    return false;
  }
  *words = static_cast<const uint64_t*>(view->buf);
  *count = view->len / 8;
  return true;
}

// finish_fingerprints(words) -> bytes: words holds, per tensor, [kernel sum, dtype name hash,
// rank, size_0, ..., size_{rank-1}]; the result holds one finished fingerprint per tensor.
PyObject* finish_fingerprints(PyObject*, PyObject* arg) {
  Py_buffer view;
  const uint64_t* w;
  Py_ssize_t n;
  if (!read_words(arg, &view, &w, &n)) return nullptr;
  std::vector<uint64_t> out;
  Py_ssize_t i = 0;
  while (i < n) {
    if (n - i < 3 || static_cast<uint64_t>(n - i - 3) < w[i + 2]) {
      PyBuffer_Release(&view);
      PyErr_SetString(PyExc_ValueError, "finish_fingerprints: truncated record");
      return nullptr;
    }
    uint64_t h = mix(w[i] ^ kTensorTag);
    h = mix(h ^ w[i + 1]);
    const uint64_t rank = w[i + 2];
    h = mix(h ^ rank);
    for (uint64_t d = 0; d < rank; ++d) h = mix(h ^ w[i + 3 + static_cast<Py_ssize_t>(d)]);
    out.push_back(h);
    i += 3 + static_cast<Py_ssize_t>(rank);
  }
  PyBuffer_Release(&view);
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                   static_cast<Py_ssize_t>(out.size() * 8));
}

// combine_fingerprints(words) -> int: words holds [name hash, fingerprint] pairs; the result is
// combine_state's order-independent digest of them.
PyObject* combine_fingerprints(PyObject*, PyObject* arg) {
  Py_buffer view;
  const uint64_t* w;
  Py_ssize_t n;
  if (!read_words(arg, &view, &w, &n)) return nullptr;
  if (n % 2 != 0) {
    PyBuffer_Release(&view);
    PyErr_SetString(PyExc_ValueError, "combine_fingerprints: expected (name hash, fingerprint) pairs");
    return nullptr;
  }
  uint64_t total = 0;
  for (Py_ssize_t i = 0; i < n; i += 2) total += mix(w[i] ^ w[i + 1]);
  PyBuffer_Release(&view);
  return PyLong_FromUnsignedLongLong(mix(mix(total ^ kStateTag) ^ static_cast<uint64_t>(n / 2)));
}

PyMethodDef methods[] = {
    {"finish_fingerprints", finish_fingerprints, METH_O, "finish fingerprints (see replay/fingerprinting.py)"},
    {"combine_fingerprints", combine_fingerprints, METH_O, "combine fingerprints (see replay/fingerprinting.py)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// `import replay._C` loads this shared object, which registers the ops below with the
// dispatcher; the Python module itself holds only the host-side fingerprint finishing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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
