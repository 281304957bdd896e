"""replay.optim.Adam and AdamW: torch.optim.Adam / AdamW with replay's fused kernel."""

from __future__ import annotations

import torch

from .. import _ops
from ..fingerprinting import fingerprint_scalar
from ._common import FusedOptimizerMixin


class _AdamFamily(FusedOptimizerMixin):
    _replay_float_keys = ("lr", "betas", "eps", "weight_decay")
    _replay_uses_sqrt = True

    def _replay_group_step(self, group, params, weights, grads):
        amsgrad = group["amsgrad"]
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, step_tensors = [], [], [], [], []
        for p, w in zip(params, weights):
            state = self.state[p]
            if "step" not in state:
                # torch.optim.Adam._init_group's layout (capturable and fused off); the moments
                # are shaped and typed as the weights the kernel updates (an fp32 master's).
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            step_t = state["step"]
            # torch increments a float32 tensor and reads it back as a Python float.
            step_t += 1
            steps.append(step_t.item())
            step_tensors.append(step_t)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        beta1, beta2 = group["betas"]
        sums = _ops.adam_step_(
            weights,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=group.get("decoupled_weight_decay", False),
            amsgrad=amsgrad,
            maximize=group["maximize"],
            numerics=self._replay_numerics(params[0].device),
            fingerprint=self.fingerprint,
        )
        columns = []
        for k, p in enumerate(params):
            named = [("param", weights[k]), ("exp_avg", exp_avgs[k]), ("exp_avg_sq", exp_avg_sqs[k])]
            if amsgrad:
                named.append(("max_exp_avg_sq", max_exp_avg_sqs[k]))
            columns.append(named)
        # `steps` holds the step tensors' values, read above.
        extra = [{"step": fingerprint_scalar(t, value)} for value, t in zip(steps, step_tensors)] if self.fingerprint else None
        return columns, sums, extra


class Adam(_AdamFamily, torch.optim.Adam):
    """Drop-in torch.optim.Adam (same arguments, defaults, param groups and state_dict format,
    including decoupled_weight_decay). See replay.optim.SGD for `numerics` and `fingerprints`."""

    _replay_name = "Adam"


class AdamW(_AdamFamily, torch.optim.AdamW):
    """Drop-in torch.optim.AdamW. See replay.optim.SGD for `numerics` and `fingerprints`."""

    _replay_name = "AdamW"
