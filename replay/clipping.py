"""Gradient-norm clipping whose norm does not depend on the thread count.

torch.nn.utils.clip_grad_norm_ reduces the gradients with torch.linalg.vector_norm, and torch
does not promise that the order of a reduction's additions is independent of the thread count
(on this machine's build the results agreed for 1, 2 and 4 threads, which is no promise for
another build or CPU). Here the order of every addition is fixed by the data alone:

* each gradient is cut into rows of ROW elements (the last row padded with zeros), squared in
  float64 (exact: the square of a float32 has at most 48 significant bits) and each row summed
  along its last dimension, a reduction with many outputs, which torch hands to one thread per
  row (the order inside a row is set by ROW and the CPU's vector width, not by the threads);
* the row sums of all gradients are added with math.fsum, which is correctly rounded and so
  independent of their order.

The result is a float64 norm; tests/test_clipping.py checks it against an exact sum and across
1, 2 and 4 threads. It is not bit-equal to torch's float32 clip_grad_norm_.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

ROW = 1024
EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: coefficient = max_norm / (norm + EPS)


def _row_sums(grad: torch.Tensor) -> list[float]:
    g = grad.detach().reshape(-1).double()
    pad = (-g.numel()) % ROW
    if pad:
        g = torch.cat([g, g.new_zeros(pad)])
    return (g * g).reshape(-1, ROW).sum(dim=1).tolist()


def grad_norm(parameters: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all gradients of `parameters` (those without a gradient are skipped), in
    float64, the same for any thread count. inf or NaN gradients give an inf or NaN norm."""
    sums: list[float] = []
    for p in parameters:
        if p.grad is not None:
            if p.grad.is_sparse:
                raise RuntimeError("replay.clipping: sparse gradients are not supported")
            sums.extend(_row_sums(p.grad))
    return math.sqrt(math.fsum(sums)) if sums else 0.0


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)), torch's rule, with the norm of
    `grad_norm`; returns that norm (before clipping). Gradients are left untouched, bit for bit,
    when the norm is within max_norm; a NaN norm makes them NaN, as torch's clipping does."""
    if not (isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool)
            and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
    parameters = [p for p in parameters if p.grad is not None]
    norm = grad_norm(parameters)
    coefficient = float(max_norm) / (norm + EPS)
    if not coefficient >= 1.0:  # also NaN
        for p in parameters:
            p.grad.mul_(coefficient)
    return norm
