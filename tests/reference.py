"""Pure numpy references of the portable recipe (shared/notes/numerics.md): no kernel code.

float32 arithmetic with numpy's IEEE operations; an exactly rounded float32 fma is emulated:
the float64 product of two float32 values is exact, the float64 sum is corrected to
round-to-odd with TwoSum's exact error, and rounding that to float32 is then exact (53 bits
>= 24 + 2).
"""

from __future__ import annotations

import numpy as np

f32 = np.float32


def fma(a, b, c) -> np.ndarray:
    a, b, c = (np.asarray(x, dtype=np.float32).astype(np.float64) for x in (a, b, c))
    product = a * b  # exact
    s = product + c
    # TwoSum: the exact error of the double addition.
    bp = s - product
    e = (product - (s - bp)) + (c - bp)
    # Round to odd: where inexact and the last mantissa bit is even, step toward the exact sum.
    bits = s.view(np.int64)
    fix = (e != 0) & ((bits & 1) == 0) & np.isfinite(s)
    s = np.where(fix, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def lerp(start, end, weight: float) -> np.ndarray:
    w = f32(weight)
    diff = (end - start).astype(np.float32)
    if -0.5 < w < 0.5:
        return fma(w, diff, start)
    return fma(w - f32(1.0), diff, end)


def sgd_step(p, g, buf, *, first, lr, momentum, dampening, weight_decay, nesterov, maximize):
    g = -g if maximize else g.copy()
    if weight_decay != 0:
        g = fma(p, f32(weight_decay), g)
    if momentum != 0:
        buf = g.copy() if first else fma(g, f32(1 - dampening), buf * f32(momentum))
        g = fma(buf, f32(momentum), g) if nesterov else buf
    p = fma(g, f32(-lr), p)
    return p, buf


def adam_step(p, g, m, v, vmax, *, step, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize):
    g = -g if maximize else g.copy()
    if weight_decay != 0:
        if decoupled:
            p = p * f32(1 - lr * weight_decay)
        else:
            g = fma(p, f32(weight_decay), g)
    m = lerp(m, g, 1 - beta1)
    v = fma(f32(1 - beta2) * g, g, v * f32(beta2))
    s = v
    if amsgrad:
        vmax = np.where(np.isnan(vmax) | np.isnan(v), np.nan, np.maximum(vmax, v)).astype(np.float32)
        s = vmax
    step_size = lr / (1 - beta1**step)
    bc2_sqrt = (1 - beta2**step) ** 0.5
    denom = np.sqrt(s) / f32(bc2_sqrt) + f32(eps)
    p = p + (f32(-step_size) * m) / denom
    return p.astype(np.float32), m, v, vmax


def ema_update(average, source, decay: float):
    return lerp(average, source, 1 - decay)
