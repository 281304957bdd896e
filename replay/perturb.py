"""Perturbation primitives: change exactly one piece of training memory at a fork step.

A perturbation acts at the start of step `start` (the fork step T) or over the window of steps
[start, start + window). Everything it does is a pure function of the step, so a child run can
be replayed from any of its checkpoints: one-shot changes run when step `start` begins (a
checkpoint at T holds the state *before* them), temporary changes are made before each step of
the window and undone after it, and changes of the data order or of a random stream are
functions of the step number.

Each primitive is a small class with a short name (usable on the command line as
``name:key=value,key=value``), a JSON spec (``to_json``/``from_spec``), and a declaration of
what it touches at the fork step (`touches`: the fingerprint components it may change there).
A perturbation that needs state the program does not have refuses with PerturbationRefused.

Hooks, called by replay.engine.Engine (all optional):
  contract(contract) -> contract     the child's RNG contract (re-seeding a stream)
  batch_ids(engine, step, ids) -> ids the batch of a step (data-order primitives)
  restore(engine)                    after the engine is built or restored (optimizer swaps)
  step_contract(contract, step) -> contract
                                     the contract a step of the window draws from (redraw)
  apply(engine)                      once, when step `start` begins (state primitives), or with
                                     `micro_step=i` (a spec key, for the primitives marked
                                     acts_between_micro_batches) just before micro-batch i of it
  begin_step(engine, step) -> token  before each step of the window ...
  end_step(engine, step, token)      ... and after it, before the LR scheduler steps
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .device import to_device
from .order import make_policy
from .workers import build_batch


class PerturbationRefused(ValueError):
    """The perturbation cannot act on this program (it lacks the state the perturbation names)."""


REGISTRY: dict[str, type["Perturbation"]] = {}


def _register(cls):
    REGISTRY[cls.name] = cls
    return cls


class Perturbation:
    name: ClassVar[str] = ""
    touches: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}  # parameter -> default (required when the default is ...)

    # Whether `micro_step` may be given: a one-shot change of state (apply) that means something
    # between two micro-batches of an accumulated step and does nothing else there.
    acts_between_micro_batches: ClassVar[bool] = False

    def __init__(self, start: int = 0, window: int = 1, micro_step: int | None = None, **params):
        if micro_step is not None:
            if not type(self).acts_between_micro_batches:
                acting = sorted(n for n, c in REGISTRY.items() if c.acts_between_micro_batches)
                raise ValueError(f"{self.name}: micro_step is not supported (it applies to one-shot state changes: "
                                 f"{', '.join(acting)})")
            if not isinstance(micro_step, int) or isinstance(micro_step, bool) or micro_step < 0:
                raise ValueError(f"{self.name}: micro_step must be a non-negative micro-batch index, got {micro_step!r}")
            if window != 1:
                raise ValueError(f"{self.name}: micro_step acts inside one step; the window must be 1, got {window!r}")
        self.micro_step = micro_step
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"{self.name}: start must be a non-negative step, got {start!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"{self.name}: window must be a positive number of steps, got {window!r}")
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; it takes {sorted(self.params) or 'none'}")
        values = {}
        for key, default in self.params.items():
            if key not in params and default is ...:
                raise ValueError(f"{self.name}: parameter {key!r} is required")
            values[key] = params.get(key, default)
        self.start = start
        self.window = window
        self.values = values
        self._check_values()

    def _check_values(self) -> None:
        """Validate self.values (subclasses)."""

    def __getattr__(self, key):
        values = self.__dict__.get("values", {})
        if key in values:
            return values[key]
        raise AttributeError(key)

    def to_json(self) -> dict:
        micro = {} if self.micro_step is None else {"micro_step": self.micro_step}
        return {"name": self.name, "start": self.start, "window": self.window, **micro, **self.values}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_json()})"

    @property
    def end(self) -> int:
        return self.start + self.window

    def apply_to(self, engine):
        """apply(engine), deferred: a zero-argument callable (a micro-step's hook)."""
        return lambda: self.apply(engine)

    # Hooks: no-ops by default.
    def check(self, engine) -> None:
        pass

    def contract(self, contract):
        return contract

    def batch_ids(self, engine, step: int, ids: list[int]) -> list[int]:
        return ids

    def step_contract(self, contract, step: int):
        return contract

    def restore(self, engine) -> None:
        pass

    def apply(self, engine) -> None:
        pass

    def begin_step(self, engine, step: int):
        return None

    def end_step(self, engine, step: int, token) -> None:
        pass


def _real(name: str, key: str, value, *, low: float = -math.inf, low_open: bool = False,
          high: float = math.inf, high_open: bool = False) -> float:
    """A finite real parameter within its range (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: {key} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        lo = "(" if low_open else "["
        hi = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name}: {key} must lie in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return value


def _integer(name: str, key: str, value, *, low: int | None = None, high: int | None = None,
             optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: {key} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: {key} must lie in [{low}, {'inf)' if high is None else str(high) + ']'}, got {value}")
    return value


def _text(name: str, key: str, value, *, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: {key} must be a name, got {value!r}")
    return value


def _flag(name: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: {key} must be true or false, got {value!r}")
    return value


SALT_MAX = (1 << 63) - 1


def _optimizer_state(engine, key: str, what: str):
    found = [state for state in engine.optimizer.state.values() if key in state]
    if not found:
        raise PerturbationRefused(
            f"{what}: the optimizer ({type(engine.optimizer).__name__}) holds no {key!r} state at this step"
        )
    return found


def _bn_modules(engine):
    modules = [m for m in engine.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not modules:
        raise PerturbationRefused("the model has no BatchNorm layers")
    return modules


def _ema(engine):
    if engine.ema is None:
        raise PerturbationRefused("the program keeps no EMA / teacher (Program.ema_decay is unset)")
    return engine.ema


# ----------------------------------------------------------------------------- placebo ----


@_register
class Placebo(Perturbation):
    name = "placebo"
    acts_between_micro_batches = True
    summary = "change nothing (the coverage check: a placebo child equals its parent bit for bit)"


# --------------------------------------------------------------------------- optimizer ----


class _ResetStateKey(Perturbation):
    acts_between_micro_batches = True
    touches = ("optimizer",)
    key: ClassVar[str] = ""

    def check(self, engine):
        if not engine.optimizer.state:
            raise PerturbationRefused(f"{self.name}: the optimizer has no state yet (fork at a later step)")

    def apply(self, engine):
        for state in _optimizer_state(engine, self.key, self.name):
            state[self.key].zero_()


@_register
class ResetMomentum(Perturbation):
    name = "reset_momentum"
    acts_between_micro_batches = True
    touches = ("optimizer",)
    summary = "drop SGD's momentum buffers: the next step starts them afresh from the gradient, as torch does"

    def apply(self, engine):
        for state in _optimizer_state(engine, "momentum_buffer", self.name):
            del state["momentum_buffer"]


@_register
class ResetExpAvg(_ResetStateKey):
    name = "reset_exp_avg"
    key = "exp_avg"
    summary = "zero Adam's first moment (exp_avg)"


@_register
class ResetExpAvgSq(_ResetStateKey):
    name = "reset_exp_avg_sq"
    key = "exp_avg_sq"
    summary = "zero Adam's second moment (exp_avg_sq, and max_exp_avg_sq with amsgrad)"

    def apply(self, engine):
        super().apply(engine)
        for state in engine.optimizer.state.values():
            if "max_exp_avg_sq" in state:
                state["max_exp_avg_sq"].zero_()


@_register
class ResetStep(_ResetStateKey):
    name = "reset_step"
    key = "step"
    summary = "reset Adam's step count to 0 (bias correction restarts)"


@_register
class ResetOptimizer(Perturbation):
    name = "reset_optimizer"
    acts_between_micro_batches = True
    touches = ("optimizer",)
    summary = "clear all optimizer state (as if the optimizer were new, same hyperparameters)"

    def apply(self, engine):
        engine.optimizer.state.clear()


@_register
class SwapOptimizer(Perturbation):
    name = "swap_optimizer"
    touches = ("optimizer",)
    summary = ("switch to another replay.optim optimizer (SGD, Adam, AdamW) with the given keyword "
               "arguments; carry=true maps state across (Adam exp_avg <-> SGD momentum_buffer)")
    params = {"to": ..., "lr": None, "momentum": None, "weight_decay": None, "carry": True}

    def _check_values(self):
        if self.values["to"] not in ("SGD", "Adam", "AdamW"):
            raise ValueError(f"swap_optimizer: 'to' must be SGD, Adam or AdamW, got {self.values['to']!r}")
        if self.values["lr"] is not None:
            _real(self.name, "lr", self.values["lr"], low=0, low_open=True)
        if self.values["momentum"] is not None:
            _real(self.name, "momentum", self.values["momentum"], low=0, high=1, high_open=True)
        if self.values["weight_decay"] is not None:
            _real(self.name, "weight_decay", self.values["weight_decay"], low=0)
        _flag(self.name, "carry", self.values["carry"])

    def _new_optimizer(self, engine):
        from . import optim

        old = engine.optimizer
        kwargs = {k: self.values[k] for k in ("lr", "momentum", "weight_decay") if self.values[k] is not None}
        if "lr" not in kwargs:
            kwargs["lr"] = old.param_groups[0]["lr"]
        if self.values["to"] != "SGD":
            kwargs.pop("momentum", None)
        cls = getattr(optim, self.values["to"])
        params = [p for group in old.param_groups for p in group["params"]]
        extra = {}
        if hasattr(old, "numerics"):
            extra["numerics"] = old.numerics
        return cls(params, **kwargs, **extra)

    def check(self, engine):
        if engine.scheduler is not None:
            raise PerturbationRefused("swap_optimizer: the program has an LR scheduler bound to the old optimizer")

    def restore(self, engine):
        # A child restored after the swap must hold the new optimizer before its state loads.
        if engine.completed > self.start and not getattr(engine, "_swapped", False):
            engine.optimizer = self._new_optimizer(engine)
            engine._swapped = True

    def apply(self, engine):
        old = engine.optimizer
        new = self._new_optimizer(engine)
        if self.values["carry"]:
            for p, state in old.state.items():
                carried = state.get("momentum_buffer", state.get("exp_avg"))
                if carried is None:
                    continue
                if self.values["to"] == "SGD":
                    new.state[p]["momentum_buffer"] = carried.clone()
                elif "exp_avg" in state:
                    new.state[p].update({k: v.clone() for k, v in state.items()})
                else:
                    new.state[p].update({"step": torch.tensor(0.0), "exp_avg": carried.clone(),
                                         "exp_avg_sq": torch.zeros_like(carried)})
        engine.optimizer = new
        engine._swapped = True


# --------------------------------------------------------------------------- averaging ----


@_register
class ResetEma(Perturbation):
    name = "reset_ema"
    acts_between_micro_batches = True
    touches = ("ema",)
    summary = "reset the EMA / teacher to the current weights"

    def apply(self, engine):
        ema = _ema(engine)
        ema.module.load_state_dict(engine.model.state_dict())


@_register
class EmaDecay(Perturbation):
    name = "ema_decay"
    summary = "use another EMA decay over the window"
    params = {"decay": ...}

    def _check_values(self):
        d = self.values["decay"]
        if not isinstance(d, (int, float)) or not math.isfinite(d) or not 0 <= d <= 1:
            raise ValueError(f"ema_decay: decay must be in [0, 1], got {d!r}")

    def check(self, engine):
        _ema(engine)

    def begin_step(self, engine, step):
        ema = _ema(engine)
        before = ema.decay
        ema.decay = float(self.values["decay"])
        return before

    def end_step(self, engine, step, token):
        engine.ema.decay = token


# --------------------------------------------------------------------------- batchnorm ----


@_register
class ResetBn(Perturbation):
    name = "reset_bn"
    acts_between_micro_batches = True
    touches = ("model",)
    summary = "reset BatchNorm running statistics (mean 0, variance 1, batches tracked 0)"

    def apply(self, engine):
        for m in _bn_modules(engine):
            m.reset_running_stats()


@_register
class FreezeBn(Perturbation):
    name = "freeze_bn"
    summary = "freeze BatchNorm running statistics over the window (momentum 0)"

    def check(self, engine):
        _bn_modules(engine)

    def begin_step(self, engine, step):
        saved = []
        for m in _bn_modules(engine):
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None))
            m.momentum = 0.0
        return saved

    def end_step(self, engine, step, token):
        for m, momentum, tracked in token:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@_register
class RecomputeBn(Perturbation):
    name = "recompute_bn"
    touches = ("model",)
    summary = "recompute BatchNorm statistics with a pass over the training data (cumulative average)"
    params = {"batches": None}

    def _check_values(self):
        _integer(self.name, "batches", self.values["batches"], low=1, optional=True)


    @torch.no_grad()
    def apply(self, engine):
        modules = _bn_modules(engine)
        saved = [(m, m.momentum) for m in modules]
        for m in modules:
            m.reset_running_stats()
            m.momentum = None
        program = engine.program
        n, b = program.dataset_size(), program.batch_size
        starts = list(range(0, n, b))
        if self.values["batches"] is not None:
            starts = starts[: int(self.values["batches"])]
        was_training = engine.model.training
        engine.model.train()
        engine.seed_step(self.start)  # dropout in this pass draws from the fork step's stream
        for s in starts:
            batch = program.make_batch(list(range(s, min(n, s + b))))  # draws from the globals seeded above
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            engine.model(to_device(inputs, engine.device))
        engine.model.train(was_training)
        for m, momentum in saved:
            m.momentum = momentum


# -------------------------------------------------------------------------- data order ----


@_register
class SwapWindows(Perturbation):
    name = "swap_windows"
    touches = ("order",)
    summary = ("swap the batches of steps [a, a+w) with those of [b, b+w) (a defaults to the fork step; "
               "give b, or offset for b = a + offset)")
    params = {"a": None, "b": None, "w": 1, "offset": None}

    def _check_values(self):
        for key in ("a", "b"):
            _integer(self.name, key, self.values[key], low=0, optional=True)
        _integer(self.name, "offset", self.values["offset"], optional=True)
        _integer(self.name, "w", self.values["w"], low=1)
        a = self.start if self.values["a"] is None else self.values["a"]
        if (self.values["b"] is None) == (self.values["offset"] is None):
            raise ValueError("swap_windows: give exactly one of b (a step) and offset (b = a + offset)")
        b = a + self.values["offset"] if self.values["b"] is None else self.values["b"]
        w = self.values["w"]
        if a < self.start or b < self.start:
            raise ValueError(f"swap_windows: both windows must start at or after the fork step {self.start}")
        if w < 1 or (a < b + w and b < a + w):
            raise ValueError(f"swap_windows: windows [{a}, {a + w}) and [{b}, {b + w}) must not overlap")
        self.values["a"], self.values["b"], self.values["offset"] = a, b, None

    @property
    def end(self) -> int:
        # The intervention lasts until the later window is over, whatever `window` says.
        return max(self.start + self.window, max(self.values["a"], self.values["b"]) + self.values["w"])

    def batch_ids(self, engine, step, ids):
        a, b, w = self.values["a"], self.values["b"], self.values["w"]
        if a <= step < a + w:
            return engine.policy.batch_ids(step - a + b)
        if b <= step < b + w:
            return engine.policy.batch_ids(step - b + a)
        return ids


@_register
class ShuffleWindow(Perturbation):
    name = "shuffle_window"
    touches = ("order",)
    summary = "shuffle the order of the batches within the window [T, T+W)"
    params = {"salt": 1}

    def _check_values(self):
        _integer(self.name, "salt", self.values["salt"], low=0, high=SALT_MAX)


    def _permutation(self, engine) -> list[int]:
        # Its own draw: the order stream's seed at the fork step, salted.
        seed = engine.contract.seed("order", self.start) ^ (0x5EED * int(self.values["salt"]))
        generator = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
        return torch.randperm(self.window, generator=generator).tolist()

    def batch_ids(self, engine, step, ids):
        if self.start <= step < self.end:
            perm = self._permutation(engine)
            return engine.policy.batch_ids(self.start + perm[step - self.start])
        return ids


@_register
class SwitchPolicy(Perturbation):
    name = "switch_policy"
    touches = ("order",)
    summary = "switch the sampling policy from the fork step on (e.g. to=with_replacement)"
    params = {"to": ...}

    def _policy(self, engine):
        if getattr(self, "_made", None) is None:
            self._made = make_policy(self.values["to"], engine.program.dataset_size(), engine.program.batch_size,
                                     engine.contract)
        return self._made

    def batch_ids(self, engine, step, ids):
        return self._policy(engine).batch_ids(step) if step >= self.start else ids


@_register
class DropExamples(Perturbation):
    name = "drop_examples"
    touches = ("order",)
    summary = "drop example ids from every batch for the rest of the run (batches shrink)"
    params = {"ids": ...}

    def _check_values(self):
        ids = self.values["ids"]
        if isinstance(ids, int):
            ids = [ids]
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)) or not ids or \
                not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"drop_examples: ids must be a non-empty list of example ids (ints >= 0), got {ids!r}")
        self.values["ids"] = sorted(set(ids))
        self._dropped = frozenset(self.values["ids"])

    def check(self, engine):
        n = engine.program.dataset_size()
        bad = [i for i in self.values["ids"] if i >= n]
        if bad:
            raise PerturbationRefused(f"drop_examples: ids {bad} are outside the dataset (size {n})")

    def batch_ids(self, engine, step, ids):
        if step < self.start:
            return ids
        dropped = self._dropped
        kept = [i for i in ids if i not in dropped]
        if not kept:
            raise PerturbationRefused(f"drop_examples: every example of step {step}'s batch was dropped")
        return kept


@_register
class InjectExample(Perturbation):
    name = "inject_example"
    touches = ("order",)
    summary = "put an example into the batches of the window: replace the first slot, or add it (duplicate=true)"
    params = {"id": ..., "duplicate": False}

    def _check_values(self):
        _integer(self.name, "id", self.values["id"], low=0)
        _flag(self.name, "duplicate", self.values["duplicate"])


    def check(self, engine):
        if not 0 <= self.values["id"] < engine.program.dataset_size():
            raise PerturbationRefused(f"inject_example: id {self.values['id']} is outside the dataset")

    def batch_ids(self, engine, step, ids):
        if not self.start <= step < self.end:
            return ids
        if self.values["duplicate"]:
            return list(ids) + [self.values["id"]]
        return [self.values["id"]] + list(ids[1:])


# ------------------------------------------------------------------- auxiliary state ----


@_register
class FlushComponent(Perturbation):
    name = "flush"
    summary = "reset a named extra component (a queue, a memory bank) to its initial state"
    params = {"component": ...}

    @property
    def touches(self):
        return (f"component:{self.values['component']}",)

    def check(self, engine):
        if self.values["component"] not in engine.components:
            raise PerturbationRefused(
                f"flush: the program has no component {self.values['component']!r} (it has {sorted(engine.components) or 'none'})"
            )

    def apply(self, engine):
        name = self.values["component"]
        torch.manual_seed(engine.contract.seed("init", 0))  # the factory's own randomness, as at build
        fresh = engine.program.components(engine.model)[name]
        engine.components[name].load_state_dict(fresh.state_dict())


# ------------------------------------------------------------------------------- path ----


def _named_parameter(engine, name):
    params = dict(engine.model.named_parameters())
    if name is None:
        name = next(iter(params))
    if name not in params:
        raise PerturbationRefused(f"no parameter named {name!r} (the model has {list(params)[:8]} ...)")
    return name, params[name]


# How many of the highest-scoring elements the default bit flip tries before it refuses.
BITFLIP_CANDIDATES = 64
# The named stream the random projection R of the default target's selection derives from.
BITFLIP_STREAM = "bitflip"


def _bit_mask(bit: int) -> torch.Tensor:
    return torch.tensor(1 << bit if bit < 31 else -(1 << 31), dtype=torch.int32)


def _output_tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for key in out for t in _output_tensors(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _output_tensors(item)]
    return []


def _words(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, as integers (bitwise comparison: -0.0 != 0.0, NaN == same NaN)."""
    t = t.detach().contiguous().reshape(-1)
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _top_candidates(score: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    """The (at most k) elements of a flat score vector with the largest positive scores, by
    descending score, ties by ascending index: deterministic whatever topk does with ties."""
    if k <= 0:
        return [], []
    positive = (score > 0).nonzero().flatten()
    if positive.numel() > 4 * k:  # a large tensor: keep every element at or above the k-th score
        threshold = torch.topk(score[positive], k).values[-1]
        positive = positive[score[positive] >= threshold]
    order = torch.sort(-score[positive], stable=True).indices  # stable: equal scores keep index order
    chosen = positive[order][:k]
    return score[chosen].tolist(), chosen.tolist()


@_register
class BitFlip(Perturbation):
    """Flip bit `bit` of element `index` of parameter `param`, when step `start` begins.

    The default target (no `param`, no `index`) is chosen from the training state at the fork
    step, so that the flip provably changes the model: the model runs in eval mode on the
    batch of step T; F = sum(R * outputs), with R a fixed random tensor from the run's seed and
    the stream "bitflip" at T; every element w of the trainable float32 parameters is scored by
    |dw * dF/dw|, the first-order change of F when the bit flips (dw = the flipped value minus
    w: one ulp of w for the lowest bit, so the score is |w * dF/dw| up to a factor of 2). The
    candidates, best first (ties by parameter order, then index), are flipped one at a time and
    the first whose flip changes the outputs on that batch bitwise is taken. With `param` given,
    the element is chosen within it the same way. The choice and how it was made are stored in
    the perturbation's values ("param", "index", "selected_by", "score": |dw * dF/dw|, None for a
    flip to inf or NaN; "rank": its place in the candidate order; "outputs_changed": how many
    output elements the flip changes), so the child's lineage and intervention event record them
    and a replay re-creates the flip from them without choosing again (a given index is recorded
    with "selected_by": "given").

    The selection restores every module's training flag and torch's global generators, never
    touches .grad (torch.autograd.grad), flips each candidate in place and XORs it back, and
    checks that the fingerprints of the whole training state and of the gradients are unchanged
    afterwards. It is a deterministic function of the state at T in a given environment, like the
    training steps (a replay refuses another thread count or build unless told otherwise).
    """

    name = "bitflip"
    acts_between_micro_batches = True
    touches = ("model",)
    summary = ("flip one bit (default: the lowest) of one float32 weight; by default the element of largest "
               "|dw * dF/dw| (F: the eval-mode outputs on the batch of step T, randomly projected) whose flip "
               "changes those outputs bitwise; the chosen target is recorded in the lineage")
    params = {"param": None, "index": None, "bit": 0}

    def _check_values(self):
        _text(self.name, "param", self.values["param"], optional=True)
        _integer(self.name, "index", self.values["index"], low=0, optional=True)
        _integer(self.name, "bit", self.values["bit"], low=0, high=31)
    # How the target was chosen: written by the selection, read back from a child's manifest.
    record: ClassVar[tuple[str, ...]] = ("selected_by", "score", "rank", "outputs_changed")

    def __init__(self, start: int = 0, window: int = 1, **params):
        recorded = {key: params.pop(key) for key in self.record if key in params}
        super().__init__(start, window, **params)
        self._choose = self.values["index"] is None  # the element is chosen from the state at `start`
        self._given_param = self.values["param"]
        self._chosen_for = None  # a weak reference to the engine the choice was made on
        if not self._choose:
            recorded.setdefault("selected_by", "given")
        self.values.update(recorded)

    # ------------------------------------------------------------------ the target ----

    def _parameter(self, engine, name=None):
        name, p = _named_parameter(engine, self.values["param"] if name is None else name)
        bit = int(self.values["bit"])
        if p.dtype != torch.float32 or not 0 <= bit < 32:
            raise PerturbationRefused(f"bitflip: needs a float32 parameter and a bit in [0, 32); {name} is {p.dtype}")
        return name, p, bit

    def _target(self, engine):
        name, p, bit = self._parameter(engine)
        index = int(self.values["index"])
        if not 0 <= index < p.numel():
            raise PerturbationRefused(f"bitflip: index {index} is outside {name} ({p.numel()} elements)")
        return name, p, index, bit

    def check(self, engine):
        if self._choose:
            made_on = self._chosen_for() if self._chosen_for is not None else None
            if made_on is not engine:  # not yet chosen, or chosen for another fork
                if engine.completed != self.start:
                    raise PerturbationRefused(
                        f"bitflip: the default target is chosen from the state at the step the flip acts "
                        f"({self.start}), but the engine is at step {engine.completed}; fork at step {self.start}, "
                        f"or pass param= and index=")
                for key in self.record:
                    self.values.pop(key, None)
                self.values.update(param=self._given_param, index=None)
                self.values.update(self._choose_target(engine))
                self._chosen_for = weakref.ref(engine)
        name, _, _, _ = self._target(engine)
        self.values["param"] = name  # an index given alone names an element of the first parameter

    @torch.no_grad()
    def apply(self, engine):
        if self.values["index"] is None:  # apply() without check(): choose now
            self.check(engine)
        _, p, index, bit = self._target(engine)
        words = p.view(-1).view(torch.int32)
        words[index] ^= _bit_mask(bit)

    # ------------------------------------------------------------------ selection ----

    def _inputs(self, engine):
        """The model's input in the batch of step `start`, as the step would get it."""
        t = self.start
        # the batch the engine will build (data-order perturbations; each example seeded)
        batch = build_batch(engine.program, engine.batch_plan(t))
        inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(inputs, torch.Tensor):
            raise PerturbationRefused(
                f"bitflip: cannot tell the model's input in a batch of type {type(batch).__name__} (the default "
                f"target is chosen by running the model on the input of step {t}'s batch: the batch itself, or "
                f"its first element); pass param= and index=")
        device = next((q.device for q in engine.model.parameters()), inputs.device)
        return inputs.to(device)

    def _run(self, model, inputs) -> list[torch.Tensor]:
        try:
            outputs = _output_tensors(model(inputs))
        except Exception as error:
            raise PerturbationRefused(
                f"bitflip: running the model on the input of step {self.start}'s batch failed "
                f"({type(error).__name__}: {error}); pass param= and index=") from error
        if not any(o.is_floating_point() for o in outputs):
            raise PerturbationRefused("bitflip: the model's output holds no floating-point tensor to choose a "
                                      "target by; pass param= and index=")
        return outputs

    def _choose_target(self, engine) -> dict:
        """The target (param, index and how it was chosen), from the state at `start`. Leaves the
        training state bit-identical, gradients included (checked)."""
        from .fingerprinting import fingerprints
        from .rng import stream_seed

        model = engine.model
        if self._given_param is not None:
            name, p, bit = self._parameter(engine, self._given_param)
            if not p.requires_grad:
                raise PerturbationRefused(f"bitflip: {name} does not require grad, so no element can be scored; "
                                          f"pass index=")
            candidates = [(name, p)]
        else:
            bit = int(self.values["bit"])
            if not 0 <= bit < 32:
                raise PerturbationRefused(f"bitflip: needs a float32 parameter and a bit in [0, 32); bit is {bit}")
            candidates = [(n, q) for n, q in model.named_parameters() if q.dtype == torch.float32 and q.requires_grad]
            if not candidates:
                raise PerturbationRefused("bitflip: the model has no trainable float32 parameter")
        mask = _bit_mask(bit)
        grads = [q.grad for q in model.parameters()]
        state_before = engine.fingerprints(use_optimizer=False)
        grads_before = fingerprints([g for g in grads if g is not None])
        training = [(m, m.training) for m in model.modules()]
        inputs = self._inputs(engine)
        # torch's global generators are left as they were (eval mode should draw nothing anyway).
        with torch.random.fork_rng(devices=[]):
            try:
                model.eval()
                with torch.enable_grad():
                    outputs = [o for o in self._run(model, inputs) if o.is_floating_point()]
                    # R: a fixed random projection of the outputs. The contract's seed() serves only the
                    # program's declared streams, so its seed comes from the same derivation
                    # (rng.stream_seed, SHA-256 of run seed, stream name and step) under the name "bitflip".
                    generator = torch.Generator().manual_seed(
                        stream_seed(engine.contract.run_seed, BITFLIP_STREAM, self.start))
                    f = sum((o.double() * torch.randn(o.shape, generator=generator, dtype=torch.float64)
                             .to(o.device)).sum() for o in outputs)
                    params = [q for _, q in candidates]
                    if isinstance(f, torch.Tensor) and f.requires_grad:
                        dfdw = torch.autograd.grad(f, params, allow_unused=True)  # never touches .grad
                    else:
                        dfdw = [None] * len(params)
                    del f, outputs
                with torch.no_grad():
                    ranked, effective = [], 0
                    for position, ((name, q), g) in enumerate(zip(candidates, dfdw)):
                        if g is None:
                            continue
                        w = q.detach().reshape(-1)
                        flipped = (w.contiguous().view(torch.int32) ^ mask).view(torch.float32)
                        change = (flipped.double() - w.double()).abs()
                        score = change * g.detach().reshape(-1).double().abs()
                        # A flip to inf or NaN (a high bit) or a NaN gradient: rank it first, let the check decide.
                        score = torch.where(torch.isfinite(change) & ~torch.isnan(score), score,
                                            torch.full_like(score, math.inf))
                        effective += int((score > 0).sum())
                        values, indices = _top_candidates(score.cpu(), BITFLIP_CANDIDATES)
                        ranked += [(-v, position, i) for v, i in zip(values, indices)]
                    del dfdw
                    ranked = sorted(ranked)[:max(BITFLIP_CANDIDATES, 0)]
                    reference = [_words(o) for o in self._run(model, inputs)]
                    again = [_words(o) for o in self._run(model, inputs)]
                    if not all(torch.equal(a, b) for a, b in zip(reference, again)):
                        raise PerturbationRefused(
                            f"bitflip: the model's eval-mode outputs on the batch of step {self.start} are not "
                            f"reproducible, so no flip can be shown to change them; pass param= and index=")
                    chosen = None
                    for rank, (negative_score, position, index) in enumerate(ranked, start=1):
                        name, q = candidates[position]
                        words = q.view(-1).view(torch.int32)
                        words[index] ^= mask
                        try:
                            after = [_words(o) for o in self._run(model, inputs)]
                        finally:
                            words[index] ^= mask  # XOR again: the exact value back
                        changed = sum(int((a != b).sum()) if a.shape == b.shape else a.numel()
                                      for a, b in zip(reference, after))
                        if changed:
                            chosen = (name, index, -negative_score, rank, changed)
                            break
            finally:
                for m, mode in training:
                    m.training = mode
        same_grads = all(q.grad is g for q, g in zip(model.parameters(), grads))
        if (engine.fingerprints(use_optimizer=False) != state_before or not same_grads
                or fingerprints([g for g in grads if g is not None]) != grads_before):
            raise PerturbationRefused("bitflip: running the model to choose the target changed the training state "
                                      "(a forward hook or a stateful module?); pass param= and index=")
        if chosen is None:
            where = ", ".join(n for n, _ in candidates[:4]) + (", ..." if len(candidates) > 4 else "")
            tried = ", ".join(f"{candidates[pos][0]}[{i}]" for _, pos, i in ranked[:5]) + (", ..." if len(ranked) > 5 else "")
            what = (f"none of the {len(ranked)} elements of largest |dw * dF/dw| (of {effective} with a non-zero one: "
                    f"{tried}) changes" if effective else
                    f"no element of {where} has a non-zero first-order effect |dw * dF/dw| on")
            raise PerturbationRefused(
                f"bitflip: {what} the model's eval-mode outputs on the batch of step {self.start} when bit {bit} "
                f"flips; pass bit= a higher bit, or param= and index= explicitly")
        name, index, score, rank, changed = chosen
        score = score if math.isfinite(score) else None  # a flip to inf or NaN: no finite first-order change
        how = (f"max |dw * dF/dw| over {'the elements of ' + name if self._given_param else 'the trainable float32 parameters'}, "
               f"F = sum(R * eval-mode outputs on the batch of step {self.start}), R from stream "
               f"'{BITFLIP_STREAM}' at step {self.start}; output change verified")
        return {"param": name, "index": index, "selected_by": how, "score": score, "rank": rank,
                "outputs_changed": changed}


@_register
class WeightNoise(Perturbation):
    name = "weight_noise"
    acts_between_micro_batches = True
    touches = ("model",)
    summary = "add Gaussian noise of standard deviation `std` to the weights, from its own random stream"
    params = {"std": ..., "param": None, "salt": 1}

    def _check_values(self):
        _real(self.name, "std", self.values["std"], low=0)
        _text(self.name, "param", self.values["param"], optional=True)
        _integer(self.name, "salt", self.values["salt"], low=0, high=SALT_MAX)


    @torch.no_grad()
    def apply(self, engine):
        seed = engine.contract.seed("init", 0) ^ (0x0015E * int(self.values["salt"])) ^ self.start
        generator = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
        targets = [_named_parameter(engine, self.values["param"])[1]] if self.values["param"] else list(engine.model.parameters())
        for p in targets:
            # Drawn on the CPU (the same noise on every device), added where the parameter lives.
            p.add_((torch.randn(p.shape, generator=generator, dtype=p.dtype) * float(self.values["std"])).to(p.device))


@_register
class LrScale(Perturbation):
    name = "lr_scale"
    summary = "multiply the learning rate by `factor` over the window"
    params = {"factor": ...}

    def _check_values(self):
        _real(self.name, "factor", self.values["factor"], low=0)


    def begin_step(self, engine, step):
        saved = [group["lr"] for group in engine.optimizer.param_groups]
        for group in engine.optimizer.param_groups:
            group["lr"] = group["lr"] * float(self.values["factor"])
        return saved

    def end_step(self, engine, step, token):
        for group, lr in zip(engine.optimizer.param_groups, token):
            group["lr"] = lr


# ------------------------------------------------------------------------- loss scaler ----


def _scaler(engine, what: str):
    if engine.scaler is None:
        raise PerturbationRefused(f"{what}: the program has no loss scaler (Program.grad_scaler is unset)")
    return engine.scaler


@_register
class ResetScaler(Perturbation):
    name = "reset_scaler"
    touches = ("scaler",)
    summary = "reset the GradScaler: the loss scale back to the program's init_scale, growth tracker 0"

    def check(self, engine):
        _scaler(engine, self.name)

    def apply(self, engine):
        scaler = _scaler(engine, self.name)
        scaler.reset(scaler.arguments["init_scale"], 0)


@_register
class ScaleScaler(Perturbation):
    name = "scale_scaler"
    touches = ("scaler",)
    summary = "multiply the GradScaler's loss scale by `factor` (rounded to float32; growth tracker kept)"
    params = {"factor": ...}

    def _check_values(self):
        _real(self.name, "factor", self.values["factor"], low=0, low_open=True)

    def check(self, engine):
        _scaler(engine, self.name)

    def apply(self, engine):
        from .precision import float32

        scaler = _scaler(engine, self.name)
        state = scaler.state_dict()
        scale = float32(state["scale"] * float(self.values["factor"]))
        if not (math.isfinite(scale) and scale > 0):
            raise PerturbationRefused(f"{self.name}: scale {state['scale']!r} times {self.values['factor']!r} is "
                                      f"{scale!r} in float32, not a usable loss scale")
        scaler.reset(scale, state["_growth_tracker"])


# -------------------------------------------------------------------------- randomness ----


class _OneStream(Perturbation):
    """A perturbation of one declared random stream (its draws, not the state)."""

    def _check_values(self):
        _text(self.name, "stream", self.values["stream"])
        _integer(self.name, "salt", self.values["salt"], low=0, high=SALT_MAX)

    @property
    def touches(self):
        return (f"rng:{self.values['stream']}",)

    def _reseeded(self, contract, step: int):
        """The contract with the stream re-seeded from `step` (refused for an undeclared stream)."""
        stream = self.values["stream"]
        if stream not in contract.streams:
            raise PerturbationRefused(f"{self.name}: no stream {stream!r} (streams: {list(contract.streams)})")
        return contract.with_reseed(stream, step, int(self.values["salt"]))


@_register
class Reseed(_OneStream):
    name = "reseed"
    summary = "re-seed one named random stream from the fork step on (every other stream unchanged)"
    params = {"stream": ..., "salt": 1}

    def contract(self, contract):
        return self._reseeded(contract, self.start)


@_register
class Redraw(_OneStream):
    """Different draws of one random stream over the window only (the back-flow witness's
    instrument A': the same batches, other dropout or augmentation draws); after the window the
    stream draws what the parent drew. `reseed` changes a stream for good."""

    name = "redraw"
    summary = "other draws of one random stream (default: dropout) over the window only; the parent's draws after it"
    params = {"stream": "dropout", "salt": 1}

    def _check_values(self):
        super()._check_values()
        if self.values["stream"] in ("init", "order"):
            raise ValueError(f"redraw: stream {self.values['stream']!r} is not drawn per step (init builds the "
                             "model, order is the data order: use swap_windows or shuffle_window)")

    def contract(self, contract):
        try:  # checked once here: a salt an earlier re-seed of this stream still uses would repeat its draws
            self._reseeded(contract, self.start)
        except PerturbationRefused:
            raise
        except ValueError as error:
            raise PerturbationRefused(f"redraw: {error}") from None
        return contract  # the contract is the parent's outside the window

    def step_contract(self, contract, step):
        return self._reseeded(contract, step)


# ------------------------------------------------------------------------------ specs ----


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        pass
    if "+" in text and all(re.fullmatch(r"\d+", part) for part in text.split("+")):
        return [int(part) for part in text.split("+")]
    return text


def parse_spec(text: str) -> dict:
    """'name' or 'name:key=value,key=value' (a list of ids as 3+17+42) -> a JSON spec."""
    name, _, rest = text.partition(":")
    spec: dict[str, Any] = {"name": name.strip()}
    if rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"perturbation spec {text!r}: expected key=value, got {item!r}")
            spec[key.strip()] = _parse_value(value.strip())
    return spec


def from_spec(spec: str | Mapping, *, start: int | None = None, window: int | None = None) -> Perturbation:
    """A perturbation from a short spec string or a JSON dict; start/window fill in what the
    spec leaves out. `starts_after` (a spec key) makes it act that many steps after `start` (the
    fork step): the back-flow witness's causal break acts when its common instrument begins."""
    spec = parse_spec(spec) if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in REGISTRY:
        raise ValueError(f"unknown perturbation {name!r}; known: {', '.join(sorted(REGISTRY))}")
    delay = spec.pop("starts_after", 0)
    if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
        raise ValueError(f"{name}: starts_after must be a non-negative number of steps, got {delay!r}")
    if delay and "start" in spec:
        raise ValueError(f"{name}: give start or starts_after, not both")
    spec.setdefault("start", (0 if start is None else start) + delay)
    spec.setdefault("window", 1 if window is None else window)
    return REGISTRY[name](**spec)


def catalogue() -> list[tuple[str, str, dict]]:
    """(name, summary, parameters) of every primitive, for `replay fork --list`."""
    return [(name, cls.summary, {k: ("<required>" if v is ... else v) for k, v in cls.params.items()})
            for name, cls in sorted(REGISTRY.items())]
