"""Typed wrappers over torch.ops.replay and their fake (meta) implementations.

The wrappers take the hyperparameters as torch.optim does and derive the kernel scalars on the
host in double precision, exactly as torch.optim computes them (shared/notes/numerics.md);
each op rounds them to float once. Every op returns the fingerprint *sums* of the tensors it
wrote, an int64 tensor [n_tensors, n_slots]; replay.fingerprint turns sums into fingerprints.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

_loaded = False
_lock = threading.Lock()


def load():
    """Load the compiled extension (registers torch.ops.replay) and the ops' fake
    implementations, once; return the op namespace. Called by every wrapper, so that importing
    replay (or modules that import this one) never loads the extension."""
    global _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                from . import _C  # noqa: F401  (registers torch.ops.replay)

                _register_fakes()
                _loaded = True
    return torch.ops.replay


def host():
    """The extension's host-side functions (finish_fingerprints, combine_fingerprints)."""
    load()
    from . import _C

    return _C


def fingerprint_sums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Wrapping 64-bit sums of position-mixed element hashes, one per tensor (contiguous,
    1/2/4/8-byte elements), as int64 bits."""
    return load().fingerprint_sums(list(tensors))


def sgd_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    first_step: list[bool],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    numerics: int,
    fingerprint: bool = True,
) -> torch.Tensor:
    """One SGD step over a list of tensors. Columns: param, momentum_buffer (if momentum);
    none with fingerprint=False."""
    return load().sgd_step_(
        params,
        grads,
        momentum_buffers if momentum != 0 else [],
        [int(f) for f in first_step] if momentum != 0 else [],
        float(weight_decay),
        float(momentum),
        1.0 - dampening,
        -lr,
        bool(nesterov),
        bool(maximize),
        bool(fingerprint),
        numerics,
    )


def adam_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    numerics: int,
    fingerprint: bool = True,
) -> torch.Tensor:
    """One Adam/AdamW step. `steps` holds each param's step count after increment.
    Columns: param, exp_avg, exp_avg_sq, max_exp_avg_sq (if amsgrad); none with
    fingerprint=False."""
    neg_step_sizes = []
    bias_correction2_sqrts = []
    for step in steps:
        # torch/optim/adam.py, _single_tensor_adam: Python floats, in this order.
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        neg_step_sizes.append(-step_size)
        bias_correction2_sqrts.append(bias_correction2**0.5)
    return load().adam_step_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if amsgrad else [],
        neg_step_sizes,
        bias_correction2_sqrts,
        1 - beta1,
        float(beta2),
        1 - beta2,
        float(eps),
        float(weight_decay),
        1 - lr * weight_decay,
        bool(decoupled),
        bool(amsgrad),
        bool(maximize),
        bool(fingerprint),
        numerics,
    )


def ema_update_(averages: list[torch.Tensor], sources: list[torch.Tensor], *, decay: float,
                fingerprint: bool = True) -> torch.Tensor:
    """average <- lerp(average, source, 1 - decay) (csrc/kernels/ema.h). Column: average."""
    return load().ema_update_(averages, sources, 1.0 - decay, bool(fingerprint))


def bandwidth_yardstick_(params, grads, exp_avgs, exp_avg_sqs) -> None:
    """p += g, m += g, v += g: the bytes of an Adam step with no arithmetic (benchmarks only)."""
    load().bandwidth_yardstick_(params, grads, exp_avgs, exp_avg_sqs)


# ---------------------------------------------------------------- fake implementations ----
# Shapes only: used by torch.compile / FakeTensor tracing and checked by opcheck.


def _sums_like(tensors: Sequence[torch.Tensor], slots: int) -> torch.Tensor:
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    return torch.empty((len(tensors), slots), dtype=torch.int64, device=device)


def _register_fakes() -> None:
    @torch.library.register_fake("replay::fingerprint_sums")
    def _fingerprint_sums_fake(tensors):
        device = tensors[0].device if len(tensors) else torch.device("cpu")
        return torch.empty((len(tensors),), dtype=torch.int64, device=device)

    @torch.library.register_fake("replay::sgd_step_")
    def _sgd_step_fake(params, grads, momentum_buffers, first_step, weight_decay, momentum,
                       one_minus_dampening, neg_lr, nesterov, maximize, fingerprint, numerics):
        return _sums_like(params, (2 if momentum != 0 else 1) if fingerprint else 0)

    @torch.library.register_fake("replay::adam_step_")
    def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, neg_step_sizes,
                        bias_correction2_sqrts, lerp_weight, beta2, one_minus_beta2, eps, weight_decay,
                        decay_factor, decoupled, amsgrad, maximize, fingerprint, numerics):
        return _sums_like(params, (4 if amsgrad else 3) if fingerprint else 0)

    @torch.library.register_fake("replay::ema_update_")
    def _ema_update_fake(averages, sources, weight, fingerprint):
        return _sums_like(averages, 1 if fingerprint else 0)

    @torch.library.register_fake("replay::bandwidth_yardstick_")
    def _bandwidth_yardstick_fake(params, grads, exp_avgs, exp_avg_sqs):
        return None
