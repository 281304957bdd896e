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

import ast
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

from .store.errors import RunError


class Stateful(Protocol):
    """An extra piece of training state (a queue, a memory bank, a replay buffer): anything with
    state_dict() / load_state_dict() whose state is tensors, numbers, strings, lists and dicts."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


@dataclass
class StepContext:
    """What a step function gets. `generators` maps every declared random stream (except
    "dropout": torch's global generator is seeded from it before every step) to a
    torch.Generator seeded for this step (a read-only mapping; each is made when first used)."""

    step: int
    epoch: int
    ids: list[int]
    batch: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any
    components: dict[str, Stateful]
    generators: Mapping[str, torch.Generator]
    program: "Program"
    # micro-batch index -> changes to make before it (a fork's perturbation with micro_step=i)
    micro_hooks: dict[int, list[Callable[[], None]]] = field(default_factory=dict)
    scaler: Any = None  # the engine's replay.precision.GradScaler with Program.grad_scaler, else None
    # In a run of several processes (replay.distributed) `ids` and `batch` are this rank's share
    # of the step's batch, `global_ids` the whole batch (the ledger's); otherwise global_ids = ids.
    global_ids: list[int] | None = None
    world: Any = None  # replay.distributed.World, or None for one process
    ranks_synchronized: bool = False

    def __post_init__(self) -> None:
        if self.global_ids is None:
            self.global_ids = self.ids

    def gather_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (rows: dim 0) concatenated in rank order, on every rank; the
        tensor itself in one process. For state every rank must update alike from every rank's
        examples, as a MoCo key queue enqueues the keys of the whole batch
        (examples/contrastive.py): replicated state, which the ranks' fingerprints check. No
        gradient flows through it."""
        if self.world is None or self.world.size == 1:
            return tensor
        return self.world.gather_rows(tensor.detach())

    def synchronize_ranks(self) -> None:
        """Call once after the step's backward passes, before clipping and the optimizer step (the
        default step does): in a run of several processes, every rank's gradients are summed in
        rank order and rank 0's buffers (BatchNorm statistics) taken, so that every rank holds
        the same bits (replay.distributed). Weight each rank's loss by len(ctx.ids) /
        len(ctx.global_ids) so that the sum is the whole batch's gradient, and return that
        weighted loss: the ledger's loss is the ranks' sum. Nothing happens in one process (and
        the weight is 1.0); a custom step run on several that never calls it is stopped."""
        if self.ranks_synchronized:
            raise RuntimeError("ctx.synchronize_ranks() was already called in this step")
        self.ranks_synchronized = True
        if self.world is not None and self.world.size > 1:
            self.world.sum_gradients(self.model.parameters())
            self.world.broadcast_buffers(self.model)

    def begin_micro_batch(self, index: int) -> None:
        """Call before running micro-batch `index` (0 for a step without accumulation): a fork
        that acts on one micro-step (a perturbation with micro_step=index) acts here. The
        default step calls it; a custom step that does not is refused by such a fork."""
        for hook in self.micro_hooks.pop(index, ()):
            hook()

    def autocast(self):
        """A context manager running its body under the program's autocast (Program.autocast:
        bf16 or fp16 on the model's device type; nothing when it is None). A custom step wraps
        its forward pass and loss in it, as the default step does; backward runs outside."""
        from .precision import autocast, device_type

        return autocast(device_type(self.model), self.program.autocast)

    def micro_batches(self) -> list[tuple[list[int], Any]]:
        """The step's examples cut into Program.accumulate micro-batches, in order: contiguous
        runs of `ids` whose sizes differ by at most one (the first ones larger; fewer parts when
        the step has fewer examples), each as (ids, rows of ctx.batch). The split is a function
        of the ids the ledger records and of `accumulate`, so a replay cuts the same ones. The
        batch must be a tensor, or a tuple, list or dict of tensors, with one row per example."""
        parts = micro_batch_count(self.program.accumulate, len(self.ids))
        size, extra = divmod(len(self.ids), parts)
        out, start = [], 0
        for i in range(parts):
            end = start + size + (1 if i < extra else 0)
            out.append((self.ids[start:end], _rows(self.batch, start, end, len(self.ids))))
            start = end
        return out


def micro_batch_count(accumulate: int, examples: int) -> int:
    """How many micro-batches a step of `examples` examples is cut into: Program.accumulate, or
    fewer when the step has fewer examples (a dropped example can shrink a batch), at least one."""
    return max(1, min(accumulate, examples))


def _rows(batch, start: int, end: int, n: int):
    """Rows start:end of a collated batch (a tensor, or a tuple, list or dict of them)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] != n:
            raise TypeError(f"micro_batches: a batch tensor of shape {tuple(batch.shape)} has no row per example ({n})")
        return batch[start:end]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows(x, start, end, n) for x in batch)
    if isinstance(batch, dict):
        return {k: _rows(v, start, end, n) for k, v in batch.items()}
    raise TypeError(f"micro_batches: cannot cut a batch of type {type(batch).__name__} into rows; "
                    "collate examples into tensors (or tuples, lists, dicts of them)")


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
    accumulate: the default step runs the step's batch as this many micro-batches (forward and
                backward each, the loss of each weighted by its share of the examples, so the
                gradient is the whole batch's), then one optimizer step; ctx.micro_batches()
                gives a custom step the same split.
    autocast:   "bf16" or "fp16": the default step runs the forward pass and the loss under
                torch.autocast with that dtype on the model's device type (parameters, gradients
                and optimizer stay float32); a custom step uses `with ctx.autocast():`.
    grad_scaler: True (torch's defaults) or a dict of torch.amp.GradScaler arguments
                (init_scale, growth_factor, backoff_factor, growth_interval), for fp16: the engine
                owns the scaler (checkpointed, fingerprinted, ctx.scaler); the default step runs
                scale(loss).backward(), unscale_, clipping, scaler.step, scaler.update. Every
                step records "loss_scale" (the scale it used) and "scaler_skipped" (1 when inf or
                NaN gradients made the scaler skip the optimizer step, else 0).
    clip_grad_norm: the default step clips the gradients to this total L2 norm before the
                optimizer step (replay.clipping: a norm that is the same for any thread count)
                and records the norm before clipping as the step's "grad_norm" metric. A custom
                step calls replay.clipping.clip_grad_norm_ itself.
    workers:    build batches in this many data-loader worker processes (persistent, prefetching);
                0 builds them in the main process. The batches are the same bits for any number
                (replay.workers): each example is built with torch's, random's and numpy's global
                generators seeded by (run seed, "augment" stream, step, example id), and always
                with one torch thread, as a worker runs.
    components: (model) -> {name: Stateful}, extra state that is checkpointed and fingerprinted.
    order:      data-order policy name or spec ("reshuffle", "with_replacement", "shuffle_once",
                "sequential", {"name": "curriculum", "scores": [...]}).
    streams:    extra named random streams the step function draws from.
    checkpoint_every / checkpoint_log_spaced: the checkpoint schedule (always also at the first
                and the last step).
    collate:    list of examples -> batch; stacks tensors field by field by default.
    device:     "cpu" (default), "cuda" or "cuda:N" (replay.device): the model is built on the
                CPU, then it, the optimizer, EMA and components live on the device and batches
                move there. A step function that makes tensors puts them on ctx.model's device.
    """

    model: Callable[[], torch.nn.Module]
    dataset: Any
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    step: Callable[[StepContext], Any] | None = None
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] = _default_optimizer
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    ema_decay: float | None = None
    clip_grad_norm: float | None = None
    accumulate: int = 1
    workers: int = 0
    autocast: str | None = None
    grad_scaler: bool | Mapping = False
    components: Callable[[torch.nn.Module], Mapping[str, Stateful]] | None = None
    batch_size: int = 32
    steps: int = 100
    order: Any = "reshuffle"
    seed: int = 0
    device: str = "cpu"
    streams: tuple[str, ...] = ()
    checkpoint_every: int = 100
    checkpoint_log_spaced: bool = False
    collate: Callable[[list], Any] | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)
    # Where it was loaded from (a ProgramSource), set by load_program: the other ranks of a run
    # of several processes load the same reference.
    source: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.model):
            raise TypeError("Program.model must be a zero-argument factory returning an nn.Module")
        if self.step is None and self.loss is None:
            raise ValueError("Program needs a loss (for the default step) or a step function")
        for name in ("batch_size", "steps", "checkpoint_every", "accumulate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Program.{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Program.seed must be a non-negative int, got {self.seed!r}")
        from .device import check_spec

        # The name only: availability is checked where the device is used, so a file naming
        # "cuda" still loads on a CPU machine (to replay there with an explicit allowance).
        check_spec(self.device)
        if self.ema_decay is not None and not (
            isinstance(self.ema_decay, (int, float)) and math.isfinite(self.ema_decay) and 0 <= self.ema_decay <= 1
        ):
            raise ValueError(f"Program.ema_decay must be in [0, 1], got {self.ema_decay!r}")
        if self.clip_grad_norm is not None and not (
            isinstance(self.clip_grad_norm, (int, float)) and not isinstance(self.clip_grad_norm, bool)
            and math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0
        ):
            raise ValueError(f"Program.clip_grad_norm must be a positive finite number, got {self.clip_grad_norm!r}")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
            raise ValueError(f"Program.workers must be a non-negative int, got {self.workers!r}")
        from .precision import check_autocast, scaler_arguments

        check_autocast(self.autocast)
        scaler_arguments(self.grad_scaler)
        if self.accumulate > self.batch_size:
            raise ValueError(f"Program.accumulate ({self.accumulate}) cannot exceed batch_size ({self.batch_size}): "
                             "a micro-batch needs at least one example")
        if self.clip_grad_norm is not None and self.step is not None:
            raise ValueError("Program.clip_grad_norm applies to the default step; a custom step calls "
                             "replay.clipping.clip_grad_norm_(ctx.model.parameters(), max_norm) itself")
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

    @property
    def indexes_tensors(self) -> bool:
        """A batch is made by indexing a tuple of tensors: no example code runs, nothing is drawn."""
        return isinstance(self.dataset, tuple) and self.collate is None

    def make_batch(self, ids: Sequence[int]):
        """The batch of these example ids, with no seeding (the engine's make_batch seeds each
        example's draws from the RNG contract)."""
        if self.indexes_tensors:
            index = torch.as_tensor(list(ids), dtype=torch.long)
            return tuple(t[index] for t in self.dataset)
        return self.collate_examples([self.example(i) for i in ids])

    def collate_examples(self, examples: list):
        return self.collate(examples) if self.collate is not None else default_collate(examples)

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
#
# A run directory is input, not code: the manifest names a program, and that program is only
# executed once the file it names hashes to the SHA-256 the manifest records. Resolving a
# reference to a file therefore executes nothing:
#
# * ``path/to/file.py:attr``: the path itself.
# * ``pkg.mod:attr``: the top-level name is located with importlib.util.find_spec, which runs
#   the installed import finders but no module code (find_spec of an undotted name imports
#   nothing), and the rest of the dotted name is walked on disk through the package folders
#   (``mod.py`` or ``mod/__init__.py`` in the parent's search locations). find_spec on a dotted
#   name would import (execute) every parent package first, which is why it is not used.
#
# Then the file's bytes are hashed and compared, the attribute is looked up in the file's
# syntax tree (it must be defined there at top level: a def, a class or an assignment), and
# only then is the file executed. A path reference is executed from the very bytes that were
# hashed. A module reference is imported normally, which also runs its parent packages'
# __init__ files: those are part of the installed environment, not of the run, and are not
# hashed (the residual risk: a hostile manifest can make replay import an installed package
# and call a zero-argument function defined in a file whose hash it knows).


class ProgramReferenceError(RunError, ValueError):
    """A program reference that cannot be resolved to a Python source file defining it."""


@dataclass(frozen=True)
class ProgramSource:
    """Where a program came from: the reference as given, the defining file and its SHA-256."""

    reference: str
    path: str
    sha256: str


@dataclass(frozen=True)
class ResolvedReference:
    """A reference resolved to its file without executing anything: the module target, the
    attribute, whether the target is a file path, the absolute path, and the file's bytes."""

    reference: str
    target: str
    attribute: str
    is_path: bool
    path: str
    source: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source).hexdigest()


def _split_reference(reference: str) -> tuple[str, str]:
    if not isinstance(reference, str):
        raise ProgramReferenceError(f"a program reference must be a string, got {type(reference).__name__}")
    target, sep, attribute = reference.rpartition(":")
    if not sep or not target or not attribute:
        raise ProgramReferenceError(
            f"program reference {reference!r} must look like 'package.module:attribute' or 'path/to/file.py:attribute'"
        )
    if not attribute.isidentifier():
        raise ProgramReferenceError(f"program reference {reference!r}: {attribute!r} is not a Python name")
    return target, attribute


def _is_path_target(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def _module_file(target: str) -> str:
    """The source file of module `target` (dotted), found without importing anything."""
    parts = target.split(".")
    if not all(p.isidentifier() for p in parts):
        raise ProgramReferenceError(f"{target!r} is not a module name")
    module = sys.modules.get(target)
    if module is not None and getattr(module, "__file__", None):
        return os.path.abspath(module.__file__)
    try:
        spec = importlib.util.find_spec(parts[0])  # undotted: runs finders, imports nothing
    except (ImportError, ValueError) as error:
        raise ProgramReferenceError(f"cannot locate module {parts[0]!r}: {error}") from None
    if spec is None:
        raise ProgramReferenceError(f"no module named {parts[0]!r} (reference target {target!r})")
    if len(parts) == 1:
        origin = spec.origin
        if not spec.has_location or not origin or not origin.endswith(".py"):
            raise ProgramReferenceError(f"{target!r}: the module has no Python source file to hash")
        return os.path.abspath(origin)
    locations = list(spec.submodule_search_locations or [])
    for i, name in enumerate(parts[1:], start=2):
        last = i == len(parts)
        found = None
        for folder in locations:
            package = os.path.join(folder, name)
            if os.path.isfile(os.path.join(package, "__init__.py")) or os.path.isdir(package):
                if not last:
                    found = package
                    break
                if os.path.isfile(os.path.join(package, "__init__.py")):
                    found = os.path.join(package, "__init__.py")
                    break
            if last and os.path.isfile(package + ".py"):
                found = package + ".py"
                break
        if found is None:
            raise ProgramReferenceError(f"no module named {'.'.join(parts[:i])!r} (reference target {target!r})")
        locations = [found]
    return os.path.abspath(found)


def resolve_reference(reference: str) -> ResolvedReference:
    """Resolve a reference to its source file and read the file, executing nothing."""
    target, attribute = _split_reference(reference)
    is_path = _is_path_target(target)
    if is_path:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"program file {target!r} does not exist")
    else:
        path = _module_file(target)
        if not path.endswith(".py"):
            raise ProgramReferenceError(f"{target!r} resolves to {path}, not a Python source file")
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as error:
        raise ProgramReferenceError(f"cannot read the program file {path}: {error.strerror or error}") from None
    return ResolvedReference(reference, target, attribute, is_path, path, source)


def _defined_names(tree: ast.Module) -> set[str]:
    """Names bound by top-level statements of a module: def, class, assignments (including
    inside top-level if / try / with blocks). Imported names do not count: they are not
    defined by this file, and its hash does not cover them."""
    names: set[str] = set()

    def targets(node) -> None:
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                targets(element)
        elif isinstance(node, ast.Starred):
            targets(node.value)

    def visit(body) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    targets(target)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and getattr(node, "value", None) is not None:
                targets(node.target)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                visit(node.body)

    visit(tree.body)
    return names


def check_defines(resolved: ResolvedReference) -> None:
    """The attribute must be defined at top level in the file itself (parsed, not executed)."""
    try:
        tree = ast.parse(resolved.source, filename=resolved.path)
    except (SyntaxError, ValueError) as error:
        raise ProgramReferenceError(f"{resolved.path}: not valid Python source ({error})") from None
    if resolved.attribute not in _defined_names(tree):
        raise ProgramReferenceError(
            f"{resolved.path} does not define {resolved.attribute!r} at top level (a def, a class or an "
            f"assignment), so the reference {resolved.reference!r} cannot be trusted to name code in this file"
        )


def _execute(resolved: ResolvedReference):
    """Execute the resolved file and return its module."""
    if resolved.is_path:
        # Executed from the very bytes that were hashed: never from a cached .pyc, which Python
        # would reuse for an edit of the same size within the same second.
        name = f"replay_program_{hashlib.sha256(resolved.path.encode()).hexdigest()[:12]}"
        module = importlib.util.module_from_spec(
            importlib.util.spec_from_loader(name, loader=None, origin=resolved.path))
        module.__file__ = resolved.path
        sys.modules[name] = module
        try:
            exec(compile(resolved.source, resolved.path, "exec"), module.__dict__)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    module = importlib.import_module(resolved.target)
    path = getattr(module, "__file__", None)
    if path is None or os.path.realpath(path) != os.path.realpath(resolved.path):
        raise ProgramReferenceError(
            f"{resolved.target!r} imported from {path}, not from {resolved.path} whose hash was checked")
    return module


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def import_reference(reference: str, expected_sha256: str | None = None):
    """(object, source path, source SHA-256) for 'module:attribute' or 'path/file.py:attribute'.

    Nothing is executed until the file is resolved, its hash matches `expected_sha256` (when
    given; SourceChanged otherwise) and the attribute is defined in it."""
    resolved = resolve_reference(reference)
    if expected_sha256 is not None and resolved.sha256 != expected_sha256:
        raise SourceChanged(resolved.path, expected_sha256, resolved.sha256)
    check_defines(resolved)
    module = _execute(resolved)
    if not hasattr(module, resolved.attribute):
        raise ProgramReferenceError(f"{resolved.target!r} has no attribute {resolved.attribute!r} (reference {reference!r})")
    return getattr(module, resolved.attribute), resolved.path, resolved.sha256


class SourceChanged(RunError, ValueError):
    """The program file does not hash to the SHA-256 a run recorded; nothing was executed."""

    def __init__(self, path: str, recorded: str, now: str):
        self.path, self.recorded, self.now = path, recorded, now
        super().__init__(f"the program source {path} changed (sha256 {recorded[:12]}... recorded, "
                         f"{now[:12]}... now); it was not executed")


def load_program(reference: str, expected_sha256: str | None = None) -> tuple[Program, ProgramSource]:
    """Import the program a reference names, with the file that defines it and that file's hash.
    With `expected_sha256`, the file is executed only if it hashes to that (SourceChanged if not)."""
    obj, path, sha256 = import_reference(reference, expected_sha256)
    program = obj() if callable(obj) and not isinstance(obj, Program) else obj
    if not isinstance(program, Program):
        raise ProgramReferenceError(
            f"{reference!r} is a {type(program).__name__}, not a replay.Program (or a function returning one)")
    source = ProgramSource(reference=reference, path=path, sha256=sha256)
    program.source = source
    return program, source
