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

}  // namespace replay
