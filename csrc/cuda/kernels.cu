// CUDA kernels of the replay ops: multi-tensor loops over the per-element arithmetic in
// csrc/kernels/, the same inline functions the CPU kernels call, so both devices produce the
// same bits. Torch-free on purpose: the torch wrapper is csrc/cuda/ops_cuda.cpp.
//
// Floating-point rules (shared/notes/numerics.md, "A portable recipe"): this file is compiled
// with --fmad=false -prec-div=true -prec-sqrt=true -ftz=false, so the only fused multiply-adds
// are the explicit __fmaf_rn calls marked FMA_SITE in csrc/kernels/common.h (only portable
// numerics exist on CUDA: kFused == true everywhere). tools/check_cuda_sources.py compiles
// this file to PTX and checks exactly that.
//
// Work decomposition (NVIDIA apex's multi_tensor_apply): the host packs up to kMaxTensors
// tensors and kMaxBlocks chunks into a metadata struct passed to the kernel by value; block b
// processes chunk block_chunk[b] of tensor block_tensor[b], its threads striding over the
// chunk's elements. Every element is computed on its own and fingerprint sums are wrapping
// integer sums, so neither the chunking nor the batching nor the order of the atomics can
// change any result.
#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/adam.h"
#include "../kernels/ema.h"
#include "../kernels/fingerprint.h"
#include "../kernels/sgd.h"
#include "launch.h"

namespace replay {
namespace cuda {
namespace {

using kernels::float_term;
using kernels::fingerprint_word_term;

// Every kernel is launched with exactly kBlockThreads threads, and the element loops stride by
// this constant rather than blockDim.x: their trip counts then need no integer division.
constexpr int kBlockThreads = 512;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;
// Elements per chunk (one block's work): 128 per thread, large enough that the per-block
// fingerprint reduction and atomics are negligible, small enough to spread a single tensor of
// a few million elements over all SMs.
constexpr int64_t kChunkElements = 65536;
// Chunks per launch. With the tensor counts below it keeps every metadata struct under the
// classic 4 KiB kernel-parameter limit (checked by static_assert).
constexpr int kMaxBlocks = 320;

// Tensors per launch for a given number of tensor lists (apex's depth_to_max_tensors).
constexpr int max_tensors_for_depth(int depth) {
  return depth == 1 ? 96 : depth == 2 ? 64 : depth == 3 ? 48 : depth == 4 ? 36 : 30;
}

struct NoPerTensor {};

// Everything a launch needs to know about its tensors. Passed by value: it lands in the
// kernel's parameter space, so no host-to-device copy and no allocation per launch.
template <int kDepth, typename PerTensor>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors_for_depth(kDepth);
  void* ptrs[kDepth][kMaxTensors];
  int64_t numels[kMaxTensors];
  // Row of this tensor in the op's lists (and in the fingerprint output): a tensor whose
  // chunks do not fit in one launch continues in the next launch at another slot.
  int32_t row[kMaxTensors];
  PerTensor extra[kMaxTensors];
  uint8_t block_tensor[kMaxBlocks];  // slot in this struct, < kMaxTensors <= 255
  int32_t block_chunk[kMaxBlocks];
};

struct FingerprintPerTensor {
  int32_t element_size;
};
struct SgdPerTensor {
  uint32_t first_step_mask;  // kernels::mask_of(first momentum step of this tensor)
};
struct AdamPerTensor {
  float neg_step_size;
  float bias_correction2_sqrt;
};

using FingerprintMeta = TensorListMeta<1, FingerprintPerTensor>;
using SgdMeta = TensorListMeta<3, SgdPerTensor>;
using AdamMeta = TensorListMeta<5, AdamPerTensor>;
using EmaMeta = TensorListMeta<2, NoPerTensor>;
using YardstickMeta = TensorListMeta<4, NoPerTensor>;

// Leaves room for the other kernel arguments (scalars, output pointer) under 4 KiB.
static_assert(sizeof(FingerprintMeta) <= 3968, "fingerprint metadata too large");
static_assert(sizeof(SgdMeta) <= 3968, "SGD metadata too large");
static_assert(sizeof(AdamMeta) <= 3968, "Adam metadata too large");
static_assert(sizeof(EmaMeta) <= 3968, "EMA metadata too large");
static_assert(sizeof(YardstickMeta) <= 3968, "yardstick metadata too large");

// The slice of one tensor that this block owns.
struct Chunk {
  int slot;       // index into the metadata arrays
  int64_t begin;  // element range [begin, end) of the tensor
  int64_t end;
};

template <typename Meta>
__device__ __forceinline__ Chunk this_block_chunk(const Meta& meta) {
  const int slot = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t end = min(begin + kChunkElements, meta.numels[slot]);
  return {slot, begin, end};
}

// Adds each thread's partial sums to sums[row * kSlots + k]: a warp-shuffle and shared-memory
// reduction first, so that a block issues one atomic per slot. Every thread of the block must
// call it (it synchronizes the block).
template <int kSlots>
__device__ __forceinline__ void block_add_sums(const uint64_t (&partial)[kSlots],
                                               unsigned long long* sums, int64_t row) {
  __shared__ unsigned long long warp_sums[kSlots][kWarpsPerBlock];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    unsigned long long v = partial[k];
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    if (lane == 0) warp_sums[k][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      unsigned long long v = lane < kWarpsPerBlock ? warp_sums[k][lane] : 0ull;
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
      }
      if (lane == 0) atomicAdd(sums + row * kSlots + k, v);
    }
  }
}

// ------------------------------------------------------------------------- fingerprints ----

template <typename Word>
__device__ __forceinline__ uint64_t fingerprint_chunk(const void* data, int64_t begin,
                                                      int64_t end) {
  const Word* words = static_cast<const Word*>(data);
  uint64_t acc = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    // Unsigned words: zero-extended to 64 bits, exactly as the CPU kernel reads them.
    acc += fingerprint_word_term(words[i], static_cast<uint64_t>(i));
  }
  return acc;
}

__global__ void __launch_bounds__(kBlockThreads)
    fingerprint_sums_kernel(FingerprintMeta meta, unsigned long long* sums) {
  const Chunk c = this_block_chunk(meta);
  const void* data = meta.ptrs[0][c.slot];
  uint64_t partial[1] = {0};
  // element_size is the same for the whole block: no divergence.
  switch (meta.extra[c.slot].element_size) {
    case 1: partial[0] = fingerprint_chunk<uint8_t>(data, c.begin, c.end); break;
    case 2: partial[0] = fingerprint_chunk<uint16_t>(data, c.begin, c.end); break;
    case 4: partial[0] = fingerprint_chunk<uint32_t>(data, c.begin, c.end); break;
    default: partial[0] = fingerprint_chunk<unsigned long long>(data, c.begin, c.end); break;
  }
  block_add_sums<1>(partial, sums, meta.row[c.slot]);
}

// ---------------------------------------------------------------------------------- SGD ----

// kHash: fingerprint what is written (sums not null); without it the kernels only step.
template <bool kMomentum, bool kHash>
__global__ void __launch_bounds__(kBlockThreads)
    sgd_step_kernel(SgdMeta meta, kernels::SgdScalars scalars, unsigned long long* sums) {
  constexpr int kSlots = kMomentum ? 2 : 1;
  const Chunk c = this_block_chunk(meta);
  float* param = static_cast<float*>(meta.ptrs[0][c.slot]);
  const float* grad = static_cast<const float*>(meta.ptrs[1][c.slot]);
  float* buffer = static_cast<float*>(meta.ptrs[2][c.slot]);
  const uint32_t first_step_mask = kMomentum ? meta.extra[c.slot].first_step_mask : 0u;
  uint64_t partial[kSlots] = {};
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kBlockThreads) {
    float p = param[i];
    float b = kMomentum ? buffer[i] : 0.0f;
    kernels::sgd_element<true>(p, grad[i], b, first_step_mask, scalars);
    p = kernels::canonical_nan(p);  // the GPU's own NaN already; explicit, as on the CPU
    b = kernels::canonical_nan(b);
    param[i] = p;
    if (kHash) partial[0] += float_term(p, static_cast<uint64_t>(i));
    if (kMomentum) {
      buffer[i] = b;
      if (kHash) partial[kSlots - 1] += float_term(b, static_cast<uint64_t>(i));
    }
  }
  if (kHash) block_add_sums<kSlots>(partial, sums, meta.row[c.slot]);
}

// --------------------------------------------------------------------------------- Adam ----

template <bool kAmsgrad, bool kHash>
__global__ void __launch_bounds__(kBlockThreads)
    adam_step_kernel(AdamMeta meta, kernels::AdamScalars scalars, unsigned long long* sums) {
  constexpr int kSlots = kAmsgrad ? 4 : 3;
  const Chunk c = this_block_chunk(meta);
  float* param = static_cast<float*>(meta.ptrs[0][c.slot]);
  const float* grad = static_cast<const float*>(meta.ptrs[1][c.slot]);
  float* exp_avg = static_cast<float*>(meta.ptrs[2][c.slot]);
  float* exp_avg_sq = static_cast<float*>(meta.ptrs[3][c.slot]);
  float* max_exp_avg_sq = static_cast<float*>(meta.ptrs[4][c.slot]);
  const AdamPerTensor step = meta.extra[c.slot];
  uint64_t partial[kSlots] = {};
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kBlockThreads) {
    float p = param[i], m = exp_avg[i], v = exp_avg_sq[i];
    float vmax = kAmsgrad ? max_exp_avg_sq[i] : 0.0f;
    const float radicand = kernels::adam_moments<true>(p, grad[i], m, v, vmax, scalars);
    // Correctly rounded square root (sqrt.rn.f32), as the CPU's std::sqrt. It is what sqrtf
    // compiles to under -prec-sqrt=true; the intrinsic keeps it so under any flags.
    const float root = __fsqrt_rn(radicand);
    p = kernels::canonical_nan(kernels::adam_param(p, m, root, step.neg_step_size,
                                                   step.bias_correction2_sqrt, scalars.eps));
    m = kernels::canonical_nan(m);
    v = kernels::canonical_nan(v);
    if (kAmsgrad) vmax = kernels::canonical_nan(vmax);
    param[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (kAmsgrad) max_exp_avg_sq[i] = vmax;
    if (kHash) {
      const uint64_t index = static_cast<uint64_t>(i);
      partial[0] += float_term(p, index);
      partial[1] += float_term(m, index);
      partial[2] += float_term(v, index);
      if (kAmsgrad) partial[kSlots - 1] += float_term(vmax, index);
    }
  }
  if (kHash) block_add_sums<kSlots>(partial, sums, meta.row[c.slot]);
}

// ---------------------------------------------------------------------------------- EMA ----

template <bool kHash>
__global__ void __launch_bounds__(kBlockThreads)
    ema_update_kernel(EmaMeta meta, kernels::LerpWeight weight, unsigned long long* sums) {
  const Chunk c = this_block_chunk(meta);
  float* average = static_cast<float*>(meta.ptrs[0][c.slot]);
  const float* source = static_cast<const float*>(meta.ptrs[1][c.slot]);
  uint64_t partial[1] = {0};
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kBlockThreads) {
    const float a = kernels::canonical_nan(kernels::ema_element(average[i], source[i], weight));
    average[i] = a;
    if (kHash) partial[0] += float_term(a, static_cast<uint64_t>(i));
  }
  if (kHash) block_add_sums<1>(partial, sums, meta.row[c.slot]);
}

// ------------------------------------------------------------------- bandwidth yardstick ----

__global__ void __launch_bounds__(kBlockThreads) bandwidth_yardstick_kernel(YardstickMeta meta) {
  const Chunk c = this_block_chunk(meta);
  float* p = static_cast<float*>(meta.ptrs[0][c.slot]);
  const float* g = static_cast<const float*>(meta.ptrs[1][c.slot]);
  float* m = static_cast<float*>(meta.ptrs[2][c.slot]);
  float* v = static_cast<float*>(meta.ptrs[3][c.slot]);
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kBlockThreads) {
    const float gi = g[i];
    p[i] += gi;
    m[i] += gi;
    v[i] += gi;
  }
}

// ---------------------------------------------------------------------------- batching ----

// Packs tensors 0..count-1 into metadata batches and calls launch(meta, blocks) for each full
// batch and for the last one. fill(meta, slot, t) stores tensor t's pointers and per-tensor
// values at `slot`. Empty tensors get no blocks (their fingerprint rows stay zero, as on CPU).
// Returns the first launch error.
template <typename Meta, typename Fill, typename Launch>
cudaError_t for_each_batch(int64_t count, const int64_t* numels, const Fill& fill,
                           const Launch& launch) {
  Meta meta{};
  int tensors = 0;  // slots used in `meta`
  int blocks = 0;   // blocks used in `meta`
  for (int64_t t = 0; t < count; ++t) {
    const int64_t numel = numels[t];
    if (numel == 0) continue;
    int slot = tensors++;
    fill(meta, slot, t);
    meta.numels[slot] = numel;
    meta.row[slot] = static_cast<int32_t>(t);
    const int64_t chunks = (numel + kChunkElements - 1) / kChunkElements;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      meta.block_tensor[blocks] = static_cast<uint8_t>(slot);
      meta.block_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool last_chunk = chunk == chunks - 1;
      if (blocks == kMaxBlocks || (tensors == Meta::kMaxTensors && last_chunk)) {
        launch(meta, blocks);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        blocks = 0;
        tensors = 0;
        if (!last_chunk) {
          // The rest of tensor t goes into the next batch, at slot 0.
          slot = tensors++;
          fill(meta, slot, t);
          meta.numels[slot] = numel;
          meta.row[slot] = static_cast<int32_t>(t);
        }
      }
    }
  }
  if (blocks > 0) {
    launch(meta, blocks);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_fingerprint_sums(int64_t count, const void* const* data, const int64_t* numels,
                                    const int64_t* element_sizes, unsigned long long* sums,
                                    cudaStream_t stream) {
  for (int64_t t = 0; t < count; ++t) {
    const int64_t es = element_sizes[t];
    if (es != 1 && es != 2 && es != 4 && es != 8) return cudaErrorInvalidValue;
  }
  return for_each_batch<FingerprintMeta>(
      count, numels,
      [&](FingerprintMeta& meta, int slot, int64_t t) {
        meta.ptrs[0][slot] = const_cast<void*>(data[t]);
        meta.extra[slot].element_size = static_cast<int32_t>(element_sizes[t]);
      },
      [&](const FingerprintMeta& meta, int blocks) {
        fingerprint_sums_kernel<<<blocks, kBlockThreads, 0, stream>>>(meta, sums);
      });
}

cudaError_t launch_sgd_step(const SgdTensors& tensors, const kernels::SgdScalars& scalars,
                            unsigned long long* sums, cudaStream_t stream) {
  const bool momentum = scalars.has_momentum;
  const bool hash = sums != nullptr;
  return for_each_batch<SgdMeta>(
      tensors.count, tensors.numels,
      [&](SgdMeta& meta, int slot, int64_t t) {
        meta.ptrs[0][slot] = tensors.params[t];
        meta.ptrs[1][slot] = const_cast<float*>(tensors.grads[t]);
        meta.ptrs[2][slot] = momentum ? tensors.momentum_buffers[t] : nullptr;
        meta.extra[slot].first_step_mask = kernels::mask_of(momentum && tensors.first_step[t]);
      },
      [&](const SgdMeta& meta, int blocks) {
        if (momentum && hash) {
          sgd_step_kernel<true, true><<<blocks, kBlockThreads, 0, stream>>>(meta, scalars, sums);
        } else if (momentum) {
          sgd_step_kernel<true, false><<<blocks, kBlockThreads, 0, stream>>>(meta, scalars, sums);
        } else if (hash) {
          sgd_step_kernel<false, true><<<blocks, kBlockThreads, 0, stream>>>(meta, scalars, sums);
        } else {
          sgd_step_kernel<false, false><<<blocks, kBlockThreads, 0, stream>>>(meta, scalars, sums);
        }
      });
}

cudaError_t launch_adam_step(const AdamTensors& tensors, const kernels::AdamScalars& scalars,
                             unsigned long long* sums, cudaStream_t stream) {
  const bool amsgrad = scalars.amsgrad_mask != 0;
  const bool hash = sums != nullptr;
  return for_each_batch<AdamMeta>(
      tensors.count, tensors.numels,
      [&](AdamMeta& meta, int slot, int64_t t) {
        meta.ptrs[0][slot] = tensors.params[t];
        meta.ptrs[1][slot] = const_cast<float*>(tensors.grads[t]);
        meta.ptrs[2][slot] = tensors.exp_avgs[t];
        meta.ptrs[3][slot] = tensors.exp_avg_sqs[t];
        meta.ptrs[4][slot] = amsgrad ? tensors.max_exp_avg_sqs[t] : nullptr;
        meta.extra[slot] = {tensors.neg_step_sizes[t], tensors.bias_correction2_sqrts[t]};
      },
      [&](const AdamMeta& meta, int blocks) {
        if (amsgrad && hash) {
          adam_step_kernel<true, true><<<blocks, kBlockThreads, 0, stream>>>(meta, scalars, sums);
        } else if (amsgrad) {
          adam_step_kernel<true, false><<<blocks, kBlockThreads, 0, stream>>>(meta, scalars, sums);
        } else if (hash) {
          adam_step_kernel<false, true><<<blocks, kBlockThreads, 0, stream>>>(meta, scalars, sums);
        } else {
          adam_step_kernel<false, false><<<blocks, kBlockThreads, 0, stream>>>(meta, scalars, sums);
        }
      });
}

cudaError_t launch_ema_update(int64_t count, const int64_t* numels, float* const* averages,
                              const float* const* sources, float weight, unsigned long long* sums,
                              cudaStream_t stream) {
  const kernels::LerpWeight lerp_weight = kernels::make_lerp_weight(weight);
  const bool hash = sums != nullptr;
  return for_each_batch<EmaMeta>(
      count, numels,
      [&](EmaMeta& meta, int slot, int64_t t) {
        meta.ptrs[0][slot] = averages[t];
        meta.ptrs[1][slot] = const_cast<float*>(sources[t]);
      },
      [&](const EmaMeta& meta, int blocks) {
        if (hash) {
          ema_update_kernel<true><<<blocks, kBlockThreads, 0, stream>>>(meta, lerp_weight, sums);
        } else {
          ema_update_kernel<false><<<blocks, kBlockThreads, 0, stream>>>(meta, lerp_weight, sums);
        }
      });
}

cudaError_t launch_bandwidth_yardstick(int64_t count, const int64_t* numels, float* const* params,
                                       const float* const* grads, float* const* exp_avgs,
                                       float* const* exp_avg_sqs, cudaStream_t stream) {
  return for_each_batch<YardstickMeta>(
      count, numels,
      [&](YardstickMeta& meta, int slot, int64_t t) {
        meta.ptrs[0][slot] = params[t];
        meta.ptrs[1][slot] = const_cast<float*>(grads[t]);
        meta.ptrs[2][slot] = exp_avgs[t];
        meta.ptrs[3][slot] = exp_avg_sqs[t];
      },
      [&](const YardstickMeta& meta, int blocks) {
        bandwidth_yardstick_kernel<<<blocks, kBlockThreads, 0, stream>>>(meta);
      });
}

}  // namespace cuda
}  // namespace replay
