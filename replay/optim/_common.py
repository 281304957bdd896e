"""What replay.optim's SGD, Adam and AdamW share: argument checks, collecting the tensors of
a step, and the fingerprints the fused kernels return."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence

import torch

from .. import _numerics
from ..fingerprinting import fingerprints, finish_many
from .master import LOW_PRECISION, round_to


def check_param_group(optimizer_name: str, group: dict, float_keys: Sequence[str], master_weights: bool = False) -> None:
    """Refuse what the fused kernels cannot do bit for bit, with a reason."""
    if group.get("fused"):
        raise ValueError(
            f"replay.optim.{optimizer_name} always runs replay's own fused kernel; fused=True would "
            "ask for torch's fused CPU arithmetic, which differs. Leave fused unset."
        )
    if group.get("differentiable"):
        raise ValueError(f"replay.optim.{optimizer_name} does not support differentiable=True")
    if group.get("capturable"):
        raise ValueError(f"replay.optim.{optimizer_name} does not support capturable=True")
    for key in float_keys:
        values = group[key] if isinstance(group[key], tuple) else (group[key],)
        for value in values:
            if isinstance(value, torch.Tensor):
                raise TypeError(
                    f"replay.optim.{optimizer_name}: {key} must be a Python number, not a Tensor "
                    "(torch computes tensor hyperparameters with different arithmetic)"
                )
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"replay.optim.{optimizer_name}: {key} must be finite, got {value!r}")
    devices = {p.device for p in group["params"]}
    if len(devices) > 1:
        raise ValueError(f"replay.optim.{optimizer_name}: parameters on mixed devices {sorted(map(str, devices))}")
    for p in group["params"]:
        check_dtype(optimizer_name, p.dtype, master_weights=master_weights)


def check_dtype(optimizer_name: str, dtype: torch.dtype, grad_dtype: torch.dtype | None = None,
                master_weights: bool = False) -> None:
    """The kernels read and write float32 only. bf16/fp16 parameters are stepped through fp32
    master weights (master_weights=True, replay.optim.master) or refused, never updated in their
    own precision: that arithmetic is not specified bit for bit here."""
    if dtype == torch.float32 and grad_dtype in (None, torch.float32):
        return
    if master_weights and dtype in LOW_PRECISION:
        if grad_dtype in (None, dtype):
            return
        raise TypeError(f"replay.optim.{optimizer_name}: a {dtype} parameter with a {grad_dtype} gradient")
    if dtype.is_complex or (grad_dtype is not None and grad_dtype.is_complex):
        return  # refused by check_param_and_grad, with its own reason
    got = f"{dtype} / {grad_dtype}" if grad_dtype is not None else str(dtype)
    hint = ""
    if torch.bfloat16 in (dtype, grad_dtype) or torch.float16 in (dtype, grad_dtype):
        hint = (" For bfloat16 / float16 parameters pass master_weights=True (fp32 master weights and "
                "moments, the parameter written by round-to-nearest-even), or keep the parameters float32 "
                "and run the forward pass in bf16/fp16 with Program(autocast=...).")
    raise TypeError(f"replay.optim.{optimizer_name} takes float32 parameters and gradients, got {got}.{hint}")


def check_devices(optimizer_name: str, param_groups: list[dict]) -> None:
    devices = {p.device for g in param_groups for p in g["params"]}
    if len(devices) > 1:
        raise ValueError(
            f"replay.optim.{optimizer_name}: parameters on mixed devices {sorted(map(str, devices))}; "
            "use one optimizer per device"
        )


def check_param_and_grad(optimizer_name: str, p: torch.Tensor, master_weights: bool = False) -> None:
    grad = p.grad
    if grad.is_sparse:
        raise RuntimeError(f"replay.optim.{optimizer_name} does not support sparse gradients")
    if p.is_complex() or grad.is_complex():
        raise TypeError(f"replay.optim.{optimizer_name} does not support complex parameters or gradients")
    check_dtype(optimizer_name, p.dtype, grad.dtype, master_weights)
    if grad.device != p.device:
        raise ValueError(f"replay.optim.{optimizer_name}: gradient on {grad.device}, parameter on {p.device}")
    if grad.shape != p.shape:
        raise ValueError(f"replay.optim.{optimizer_name}: gradient shape {tuple(grad.shape)} != parameter shape {tuple(p.shape)}")
    if not p.is_contiguous():
        raise ValueError(
            f"replay.optim.{optimizer_name} needs contiguous parameters (got strides {p.stride()} "
            f"for shape {tuple(p.shape)}); make the module's parameters contiguous first"
        )


def contiguous_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    return g if g.is_contiguous() else g.contiguous()


def state_indices(param_groups: list[dict]) -> dict[int, int]:
    """id(param) -> the index torch.optim's state_dict() gives that parameter."""
    indices: dict[int, int] = {}
    for group in param_groups:
        for p in group["params"]:
            indices.setdefault(id(p), len(indices))
    return indices


class StepFingerprints:
    """The fingerprint sums a fused step returned, turned into fingerprints only when asked
    (on CUDA that is when the host waits for the device)."""

    def __init__(self) -> None:
        self._batches: list[tuple[list[int], list[torch.Tensor], list[list[tuple[str, torch.Tensor]]], torch.Tensor]] = []
        self._cached: dict[int, dict[str, int]] | None = None

    def add(self, indices: list[int], columns: list[list[tuple[str, torch.Tensor]]], sums: torch.Tensor,
            extra: list[dict[str, int]] | None = None) -> None:
        self._batches.append((indices, columns, sums, extra))
        self._cached = None

    def resolve(self) -> dict[int, dict[str, int]]:
        if self._cached is None:
            result: dict[int, dict[str, int]] = {}
            for indices, columns, sums, extra in self._batches:
                rows = sums.tolist()
                finished = iter(finish_many([s for named, row in zip(columns, rows) for s in row[:len(named)]],
                                            [t for named in columns for _, t in named]))
                for k, (index, named) in enumerate(zip(indices, columns)):
                    entry = {name: next(finished) for name, _ in named}
                    if extra is not None:
                        entry.update(extra[k])
                    result[index] = entry
            self._cached = result
        return self._cached


def _torch_method(optimizer, name: str, *args, **kwargs):
    """Call torch.optim.Optimizer's `name` (add_param_group, zero_grad, state_dict,
    load_state_dict) on `optimizer`, without its torch._disable_dynamo wrapper while torch._dynamo
    has not been imported.

    Why: that wrapper imports torch._dynamo on its first call (1.4 s of a fresh process's start-up
    on the 2-core machine, paid by every experiment worker and Ray task before its first step),
    only to tell dynamo not to trace the method. Nothing can be tracing while torch._dynamo is not
    in sys.modules (torch.compile imports it), so the wrapper has nothing to do then; the body that
    runs is torch's own, unchanged (functools.wraps keeps it as __wrapped__). Once torch._dynamo is
    loaded (a program that compiles), every call goes through torch's wrapper as before, and a
    torch.optim class between the mixin and Optimizer that overrides the method is called as is."""
    bound = getattr(super(FusedOptimizerMixin, optimizer), name)
    wrapper = getattr(torch.optim.Optimizer, name)
    if bound.__func__ is wrapper and "torch._dynamo" not in sys.modules:
        return wrapper.__wrapped__(optimizer, *args, **kwargs)
    return bound(*args, **kwargs)

class FusedOptimizerMixin:
    """Shared behaviour of replay.optim optimizers (mixed into torch.optim subclasses)."""

    _replay_name = "Optimizer"
    _replay_float_keys: tuple[str, ...] = ()
    _replay_uses_sqrt = False

    def __init__(self, params, *args, numerics: str = "portable", fingerprint: bool = True,
                 master_weights: bool = False, **kwargs):
        self.numerics = _numerics.check_choice(numerics)
        self.fingerprint = bool(fingerprint)
        if not isinstance(master_weights, bool):
            raise TypeError(f"replay.optim.{self._replay_name}: master_weights must be True or False, got {master_weights!r}")
        if master_weights and self.numerics == "torch":
            raise ValueError(
                f"replay.optim.{self._replay_name}: numerics='torch' with master_weights=True has no torch.optim "
                "counterpart to match (torch.optim steps low-precision parameters in their own dtype); use "
                "numerics='portable'")
        self.master_weights = master_weights
        super().__init__(params, *args, **kwargs)  # the torch.optim class: its arguments and defaults

    @torch.no_grad()
    def step(self, closure=None):
        """One fused kernel call per param group (torch.optim's step contract, closure included)."""
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
            weights, grads, low = [], [], []
            for p in params:
                check_param_and_grad(self._replay_name, p, self.master_weights)
                is_low = self.master_weights and p.dtype in LOW_PRECISION
                if is_low:
                    master = self.state[p].get("master_param")
                    if master is None:  # the parameter widened to fp32: exact
                        master = self.state[p]["master_param"] = p.detach().to(torch.float32, copy=True)
                    weights.append(master)
                    grads.append(contiguous_grad(p).to(torch.float32))  # exact
                else:
                    weights.append(p)
                    grads.append(contiguous_grad(p))
                low.append(is_low)
            columns, sums, extra = self._replay_group_step(group, params, weights, grads)
            if any(low):
                extra = self._write_low_precision(params, weights, low, columns, extra)
            if self.fingerprint:
                record.add([indices[id(p)] for p in params], columns, sums, extra)
        self._replay_last = record
        return loss

    def _write_low_precision(self, params, weights, low, columns, extra):
        """Write each low-precision parameter from its master (round_to); the kernel's "param"
        column is the master's, renamed "master_param", and the parameter's own fingerprint is
        added (one fingerprint call for the group)."""
        written = []
        for p, master, is_low in zip(params, weights, low):
            if is_low:
                p.copy_(round_to(master, p.dtype))
                written.append(p)
        extra = [dict(e) for e in extra] if extra is not None else [{} for _ in params]
        if self.fingerprint:
            fps = iter(fingerprints(written))
            for k, is_low in enumerate(low):
                if is_low:
                    columns[k] = [("master_param", t) if name == "param" else (name, t) for name, t in columns[k]]
                    extra[k]["param"] = next(fps)
        return extra

    def _replay_group_step(self, group: dict, params: list[torch.Tensor], weights: list[torch.Tensor],
                           grads: list[torch.Tensor]):
        """Run the kernel on one group's parameters that have gradients (`weights`: the tensors
        it updates, each parameter or its fp32 master; `grads`: their fp32 gradients; state is
        kept under the parameters); return, per parameter, the (state name, tensor) pairs the
        kernel fingerprinted, the sums, and extra entries."""
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's (see _torch_method: no torch._dynamo import)."""
        _torch_method(self, "zero_grad", set_to_none)

    def state_dict(self) -> dict:
        """torch.optim's (see _torch_method: no torch._dynamo import)."""
        return _torch_method(self, "state_dict")

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's, except that the fp32 state of a master-weights parameter (its master
        and moments) stays fp32: torch casts floating-point state to the parameter's dtype."""
        _torch_method(self, "load_state_dict", state_dict)
        if not self.master_weights:
            return
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entries in state_dict["state"].items():
            p = params[int(index)]
            if p.dtype not in LOW_PRECISION:
                continue
            for key, value in entries.items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    if value.dtype != torch.float32:
                        raise ValueError(f"replay.optim.{self._replay_name}: state {key!r} of a master-weights "
                                         f"parameter must be float32, got {value.dtype}")
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def add_param_group(self, param_group: dict) -> None:  # noqa: D401 (torch's signature)
        _torch_method(self, "add_param_group", param_group)
        check_param_group(self._replay_name, self.param_groups[-1], self._replay_float_keys, self.master_weights)
        check_devices(self._replay_name, self.param_groups)

    @property
    def fingerprints(self) -> dict[int, dict[str, int]]:
        """Fingerprints of what the last step() wrote: {state index: {"param": fp, <state name>: fp}}.

        State indices are those of state_dict(); names are the optimizer's state keys. Parameters
        without a gradient in that step are absent.
        """
        if not self.fingerprint:
            raise RuntimeError(
                f"replay.optim.{self._replay_name} was made with fingerprint=False: its steps "
                "compute no fingerprints"
            )
        return self._replay_last.resolve() if hasattr(self, "_replay_last") else {}

    def clear_fingerprints(self) -> None:
        """Forget the last step's fingerprints (`fingerprints` is {} until the next step()).
        The engine calls this before every training step, so a step in which step() did not
        run (a GradScaler skipped it) never reports an earlier step's values."""
        self._replay_last = StepFingerprints()

    def _replay_numerics(self, device: torch.device) -> int:
        return _numerics.resolve(self.numerics, device, uses_sqrt=self._replay_uses_sqrt)

    def _replay_check_groups(self) -> None:
        # Groups can change after construction (schedulers, user code): check at every step.
        for group in self.param_groups:
            check_param_group(self._replay_name, group, self._replay_float_keys, self.master_weights)
