"""EMA / teacher weights: an averaged copy of a model, updated by replay's fused EMA kernel.

    average <- lerp(average, current, 1 - decay)      (csrc/kernels/ema.h)

with torch.lerp's formula and one FMA (fma(w, current - average, average) for w = 1 - decay
below 0.5, fma(w - 1, current - average, current) otherwise). For finite values decay = 0
copies the model and decay = 1 freezes the average, except that a zero may change sign
(0 * d + -0.0 is +0.0); an inf or NaN on either side makes the average NaN at any decay.
"""

from __future__ import annotations

import copy
import math

import torch

from . import _ops
from .fingerprinting import finish_many, fingerprints


class EMA:
    """An exponential moving average of `model`'s floating-point parameters and buffers.

    `module` is a frozen copy of the model holding the averages (use it as an EMA teacher or
    for evaluation). `update()` folds the model's current values in with one fused kernel call
    per device and returns the fingerprints of everything it wrote, keyed by state_dict name.
    Non-floating buffers (BatchNorm's num_batches_tracked) are copied, not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = self._checked_decay(decay)
        self.model = model
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.fingerprints: dict[str, int] = {}
        self.updates = 0  # how many update() calls wrote the averages (fingerprints are theirs)
        for name, tensor in self._pairs():
            if tensor[0].is_floating_point() and tensor[0].dtype != torch.float32:
                raise TypeError(
                    f"replay.EMA averages float32 tensors; {name!r} is {tensor[0].dtype}"
                )
            if not tensor[0].is_contiguous():
                raise ValueError(f"replay.EMA needs contiguous tensors; {name!r} is not")

    @staticmethod
    def _checked_decay(decay: float) -> float:
        if isinstance(decay, torch.Tensor) or not isinstance(decay, (int, float)):
            raise TypeError(f"EMA decay must be a Python number, got {type(decay).__name__}")
        if not math.isfinite(decay) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay!r}")
        return float(decay)

    def _pairs(self):
        """(name, (average, current)) for every parameter and buffer, in state_dict order."""
        averages = dict(self.module.named_parameters())
        averages.update(self.module.named_buffers())
        currents = dict(self.model.named_parameters())
        currents.update(self.model.named_buffers())
        if averages.keys() != currents.keys():
            raise RuntimeError("replay.EMA: the model's parameters or buffers changed since the EMA was made")
        return [(name, (averages[name], currents[name])) for name in averages]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> dict[str, int]:
        """Fold the model's current values into the average; `decay` overrides it for this call."""
        d = self.decay if decay is None else self._checked_decay(decay)
        averaged: dict[torch.device, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        copied: list[tuple[str, torch.Tensor]] = []
        for name, (average, current) in self._pairs():
            if average.is_floating_point():
                if current.dtype != torch.float32 or current.shape != average.shape or current.device != average.device:
                    raise RuntimeError(f"replay.EMA: {name!r} changed dtype, shape or device since the EMA was made")
                averaged.setdefault(average.device, []).append((name, average, current.contiguous()))
            else:
                average.copy_(current)
                copied.append((name, average))
        result: dict[str, int] = {}
        for entries in averaged.values():
            sums = _ops.ema_update_([a for _, a, _ in entries], [c for _, _, c in entries], decay=d)
            for (name, _, _), fp in zip(entries, finish_many(sums[:, 0].tolist(), [a for _, a, _ in entries])):
                result[name] = fp
        for (name, average), fp in zip(copied, fingerprints([a for _, a in copied])):
            result[name] = fp
        self.fingerprints = result
        self.updates += 1
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages, by the model's state_dict names."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averages into `model` (for evaluating with EMA weights)."""
        model.load_state_dict(self.module.state_dict())
