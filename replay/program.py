"""What a re-executable training program is, and how to load one from a reference.

A Program bundles everything the engine needs to execute step t of a run from the state after
step t - 1, and nothing else: factories (called under the RNG contract's "init" stream), the
dataset, a step function, the data-order policy and the seed. The engine owns the loop, the
random streams, checkpoints and fingerprints; the program owns the arithmetic.

A program is referenced as ``module:attribute`` or ``path/to/file.py:attribute``; the attribute
is a Program or a function returning one. The run records the reference and a SHA-256 of the
file that defines it, and a replay refuses a changed file unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class Stateful(Protocol):
    """An extra piece of training state (a queue, a memory bank, a replay buffer): anything with
    state_dict() / load_state_dict() whose state is tensors, numbers, strings, lists and dicts."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


@dataclass
class StepContext:
    """What a step function gets. `generators` holds a torch.Generator per declared random
    stream (except "dropout": torch's global generator is seeded from it before every step)."""

    step: int
    epoch: int
    ids: list[int]
    batch: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any
    components: dict[str, Stateful]
    generators: dict[str, torch.Generator]
    program: "Program"


def _default_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    from . import optim

    return optim.AdamW(model.parameters(), lr=1e-3)


@dataclass
class Program:
    """A training program the engine can re-execute bit for bit.

    model:      () -> nn.Module, called with torch's generators seeded from the "init" stream.
    dataset:    a map-style dataset (``len`` and ``__getitem__``), or a tuple of tensors with a
                common first dimension (example i is ``tuple(t[i] for t in tensors)``).
    loss:       (output, target) -> scalar tensor, for the default step (batch = (input, target)).
    step:       (StepContext) -> dict of metrics (a "loss" entry is recorded as the loss) or a
                loss tensor; replaces the default step, which runs forward, loss, backward,
                optimizer.step() and, with an EMA, ema.update().
    optimizer:  (model) -> Optimizer; replay.optim.AdamW(lr=1e-3) by default. A torch.optim
                optimizer is allowed and recorded as such (its state is fingerprinted after the
                step instead of inside the kernel).
    scheduler:  (optimizer) -> LR scheduler, stepped by the engine after every step.
    ema_decay:  keep a replay.EMA of the model (an EMA teacher) with this decay.
    components: (model) -> {name: Stateful}, extra state that is checkpointed and fingerprinted.
    order:      data-order policy name or spec ("reshuffle", "with_replacement", "shuffle_once",
                "sequential", {"name": "curriculum", "scores": [...]}).
    streams:    extra named random streams the step function draws from.
    checkpoint_every / checkpoint_log_spaced: the checkpoint schedule (always also at the first
                and the last step).
    collate:    list of examples -> batch; stacks tensors field by field by default.
    """

    model: Callable[[], torch.nn.Module]
    dataset: Any
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    step: Callable[[StepContext], Any] | None = None
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] = _default_optimizer
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    ema_decay: float | None = None
    components: Callable[[torch.nn.Module], Mapping[str, Stateful]] | None = None
    batch_size: int = 32
    steps: int = 100
    order: Any = "reshuffle"
    seed: int = 0
    streams: tuple[str, ...] = ()
    checkpoint_every: int = 100
    checkpoint_log_spaced: bool = False
    collate: Callable[[list], Any] | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not callable(self.model):
            raise TypeError("Program.model must be a zero-argument factory returning an nn.Module")
        if self.step is None and self.loss is None:
            raise ValueError("Program needs a loss (for the default step) or a step function")
        for name in ("batch_size", "steps", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Program.{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Program.seed must be a non-negative int, got {self.seed!r}")
        if self.ema_decay is not None and not (
            isinstance(self.ema_decay, (int, float)) and math.isfinite(self.ema_decay) and 0 <= self.ema_decay <= 1
        ):
            raise ValueError(f"Program.ema_decay must be in [0, 1], got {self.ema_decay!r}")
        if isinstance(self.dataset, tuple):
            sizes = {len(t) for t in self.dataset}
            if len(sizes) != 1:
                raise ValueError("Program.dataset: tensors of a tuple dataset need a common first dimension")
        if self.dataset_size() < 1:
            raise ValueError("Program.dataset is empty")
        self.streams = tuple(self.streams)

    def dataset_size(self) -> int:
        return len(self.dataset[0]) if isinstance(self.dataset, tuple) else len(self.dataset)

    def example(self, index: int):
        if isinstance(self.dataset, tuple):
            return tuple(t[index] for t in self.dataset)
        return self.dataset[index]

    def make_batch(self, ids: Sequence[int]):
        if isinstance(self.dataset, tuple) and self.collate is None:
            index = torch.as_tensor(list(ids), dtype=torch.long)
            return tuple(t[index] for t in self.dataset)
        examples = [self.example(i) for i in ids]
        if self.collate is not None:
            return self.collate(examples)
        return default_collate(examples)

    def with_overrides(self, **changes) -> "Program":
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self


def default_collate(examples: list):
    first = examples[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(examples)
    if isinstance(first, (int, float)):
        return torch.tensor(examples)
    if isinstance(first, (tuple, list)):
        return tuple(default_collate([e[k] for e in examples]) for k in range(len(first)))
    if isinstance(first, Mapping):
        return {k: default_collate([e[k] for e in examples]) for k in first}
    raise TypeError(f"cannot collate examples of type {type(first).__name__}; give Program a collate function")


# ------------------------------------------------------------------------ references ----


@dataclass(frozen=True)
class ProgramSource:
    """Where a program came from: the reference as given, the defining file and its SHA-256."""

    reference: str
    path: str
    sha256: str


def _split_reference(reference: str) -> tuple[str, str]:
    target, sep, attribute = reference.rpartition(":")
    if not sep or not target or not attribute:
        raise ValueError(
            f"program reference {reference!r} must look like 'package.module:attribute' or 'path/to/file.py:attribute'"
        )
    return target, attribute


def _import_target(target: str):
    """(module, path of its source, SHA-256 of the source it was made from)."""
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"program file {target!r} does not exist")
        with open(path, "rb") as f:
            source = f.read()
        # Executed from the very bytes that are hashed: never from a cached .pyc, which Python
        # would reuse for an edit of the same size within the same second.
        name = f"replay_program_{hashlib.sha256(path.encode()).hexdigest()[:12]}"
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None, origin=path))
        module.__file__ = path
        sys.modules[name] = module
        try:
            exec(compile(source, path, "exec"), module.__dict__)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module, path, hashlib.sha256(source).hexdigest()
    module = importlib.import_module(target)
    path = getattr(module, "__file__", None)
    if path is None:
        raise ValueError(f"{target!r}: the module has no source file to hash")
    path = os.path.abspath(path)
    return module, path, file_sha256(path)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def import_reference(reference: str):
    """(object, source path, source SHA-256) for 'module:attribute' or 'path/file.py:attribute'."""
    target, attribute = _split_reference(reference)
    module, path, sha256 = _import_target(target)
    if not hasattr(module, attribute):
        raise ValueError(f"{target!r} has no attribute {attribute!r} (reference {reference!r})")
    return getattr(module, attribute), path, sha256


def load_program(reference: str) -> tuple[Program, ProgramSource]:
    """Import the program a reference names, with the file that defines it and that file's hash."""
    obj, path, sha256 = import_reference(reference)
    program = obj() if callable(obj) and not isinstance(obj, Program) else obj
    if not isinstance(program, Program):
        raise ValueError(f"{reference!r} is a {type(program).__name__}, not a replay.Program (or a function returning one)")
    return program, ProgramSource(reference=reference, path=path, sha256=sha256)
