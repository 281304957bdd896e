"""fp32 master weights for bfloat16 / float16 parameters (replay.optim's `master_weights=True`).

The optimizer keeps, per low-precision parameter, an fp32 copy in its state ("master_param")
and fp32 moments; each step widens the gradient to fp32 (exact), runs the fused fp32 kernel on
the master copy (the same bits on CPU and CUDA, fingerprinted in the pass), and writes the
parameter as the master rounded to nearest, ties to even (`round_to`).

The rounding is the same bits on every device: bfloat16 is rounded with integer arithmetic
(the bit trick of c10's round_to_nearest_even, so no conversion instruction with its own
denormal or NaN rules is involved); float16 by torch's conversion, which is IEEE
round-to-nearest-even on CPU and CUDA alike except for NaN payloads; every NaN is then stored as
0x7FFF, the one canonical low-precision NaN (as the fp32 kernels store 0x7FFFFFFF).
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
CANONICAL_NAN = 0x7FFF  # a quiet NaN in both bfloat16 and float16


def round_to(master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`master` (float32) rounded to `dtype` (bfloat16 or float16), nearest, ties to even, with
    every NaN stored as 0x7FFF."""
    if master.dtype != torch.float32:
        raise TypeError(f"round_to: a float32 master, got {master.dtype}")
    if dtype == torch.bfloat16:
        bits = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # 0 .. 0xFFFF (inf stays inf)
        rounded = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded)  # as a signed 16-bit word
        low = rounded.to(torch.int16).view(torch.bfloat16)
    elif dtype == torch.float16:
        low = master.to(torch.float16)
    else:
        raise TypeError(f"round_to: bfloat16 or float16, got {dtype}")
    words = low.view(torch.int16)
    words.masked_fill_(torch.isnan(master), CANONICAL_NAN)
    return low

