"""replay.optim.SGD: torch.optim.SGD with replay's fused, fingerprinting kernel."""

from __future__ import annotations

import torch

from .. import _ops
from ._common import FusedOptimizerMixin


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    """Drop-in torch.optim.SGD (same arguments, defaults, param groups and state_dict format).

    `numerics="portable"` (default) gives the same bits on CPU and CUDA; `numerics="torch"`
    gives the bits torch.optim.SGD computes on this machine's CPU. After each step,
    `fingerprints` holds the fingerprints of every parameter and momentum buffer written
    (computed in the same pass over memory; `fingerprint=False` skips them).
    """

    _replay_name = "SGD"
    _replay_float_keys = ("lr", "momentum", "dampening", "weight_decay")

    def _replay_group_step(self, group, params, weights, grads):
        momentum = group["momentum"]
        buffers, first_step = [], []
        if momentum != 0:
            for p, w in zip(params, weights):
                buf = self.state[p].get("momentum_buffer")
                first_step.append(buf is None)
                if buf is None:
                    # torch clones the gradient here; the kernel writes the buffer in full
                    # (typed as the weights it updates: an fp32 master's for master weights).
                    buf = torch.empty_like(w, memory_format=torch.contiguous_format)
                    self.state[p]["momentum_buffer"] = buf
                buffers.append(buf)
        sums = _ops.sgd_step_(
            weights,
            grads,
            buffers,
            first_step,
            lr=group["lr"],
            momentum=momentum,
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            numerics=self._replay_numerics(params[0].device),
            fingerprint=self.fingerprint,
        )
        columns = []
        for k, p in enumerate(params):
            named = [("param", weights[k])]
            if momentum != 0:
                named.append(("momentum_buffer", buffers[k]))
            columns.append(named)
        return columns, sums, None
