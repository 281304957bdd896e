"""replay.optim.Adam and AdamW: torch.optim.Adam / AdamW with replay's fused kernel."""

from __future__ import annotations

import torch

from .. import _numerics, _ops
from ..fingerprinting import fingerprint_scalar
from ._common import FusedOptimizerMixin, StepFingerprints, check_param_and_grad, contiguous_grad, state_indices


class _AdamFamily(FusedOptimizerMixin):
    _replay_float_keys = ("lr", "betas", "eps", "weight_decay")
    _replay_uses_sqrt = True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._replay_check_groups()
        indices = state_indices(self.param_groups)
        record = StepFingerprints()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                check_param_and_grad(self._replay_name, p)
            amsgrad = group["amsgrad"]
            exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, step_tensors = [], [], [], [], []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    # torch.optim.Adam._init_group's layout (capturable and fused off).
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if amsgrad:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
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
                params,
                [contiguous_grad(p) for p in params],
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
            if not self.fingerprint:
                continue
            columns = []
            for k, p in enumerate(params):
                named = [("param", p), ("exp_avg", exp_avgs[k]), ("exp_avg_sq", exp_avg_sqs[k])]
                if amsgrad:
                    named.append(("max_exp_avg_sq", max_exp_avg_sqs[k]))
                columns.append(named)
            extra = [{"step": fingerprint_scalar(t)} for t in step_tensors]
            record.add([indices[id(p)] for p in params], columns, sums, extra)
        self._replay_last = record
        return loss


class Adam(_AdamFamily, torch.optim.Adam):
    """Drop-in torch.optim.Adam (same arguments, defaults, param groups and state_dict format,
    including decoupled_weight_decay). See replay.optim.SGD for `numerics` and `fingerprints`."""

    _replay_name = "Adam"

    def __init__(self, params, *args, numerics: str = "portable", fingerprint: bool = True, **kwargs):
        self.numerics = _numerics.check_choice(numerics)
        self.fingerprint = bool(fingerprint)
        super().__init__(params, *args, **kwargs)


class AdamW(_AdamFamily, torch.optim.AdamW):
    """Drop-in torch.optim.AdamW. See replay.optim.SGD for `numerics` and `fingerprints`."""

    _replay_name = "AdamW"

    def __init__(self, params, *args, numerics: str = "portable", fingerprint: bool = True, **kwargs):
        self.numerics = _numerics.check_choice(numerics)
        self.fingerprint = bool(fingerprint)
        super().__init__(params, *args, **kwargs)
