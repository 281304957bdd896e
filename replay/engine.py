"""The engine: executes steps of a Program under an RNG contract and a data-order policy, and
describes the training state after each step (fingerprints of every component) and as a
checkpoint (a nested state of tensors and plain values).

Step t (0-based) runs from the state after t completed steps: the policy gives its batch ids,
torch's global generators are seeded from the contract's "dropout" stream at t, the step
function gets a generator per other stream at t, the LR scheduler is stepped afterwards. So the
state after step t is a function of the state before it and (program, seed, t) alone: that is
what lets any stretch be replayed from a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass

import torch

from . import device as device_module
from .ema import EMA
from .fingerprinting import combine_state, fingerprints
from .optim._common import FusedOptimizerMixin, state_indices
from .order import make_policy
from .program import Program, StepContext
from .rng import BUILTIN_STREAMS, RngContract, seed_all_globals
from .store.encode import flatten_state

CHECKPOINT_FORMAT = 1


@dataclass
class StepRecord:
    """What one executed step produced (becomes a ledger row)."""

    step: int
    epoch: int
    ids: list[int]
    loss: float | None
    lr: float | None
    metrics: dict[str, float]
    fingerprints: dict[str, dict[str, int]]
    digest: int


def _json_hash(obj) -> int:
    data = json.dumps(obj, sort_keys=True, allow_nan=True).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def _nested_parts(state) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """A nested state's tensors by path (sorted) and the hash of everything that is not a tensor."""
    skeleton, tensors = flatten_state(state, copy=False)  # hashed where they live (on the device)
    return [(n, tensors[n]) for n in sorted(tensors)], _json_hash(skeleton)


def nested_fingerprints(state) -> dict[str, int]:
    """Fingerprints of a nested state (a state_dict of tensors and plain values): one per tensor,
    by its path, plus "_structure" for everything that is not a tensor."""
    named, structure = _nested_parts(state)
    result = dict(zip([n for n, _ in named], fingerprints([t for _, t in named])))
    result["_structure"] = structure
    return result


def default_step(ctx: StepContext):
    """Forward, loss, backward (per micro-batch with Program.accumulate), gradient clipping
    (with Program.clip_grad_norm), optimizer step, EMA update."""
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.program.accumulate == 1:
        inputs, target = ctx.batch
        loss = ctx.program.loss(ctx.model(inputs), target)
        loss.backward()
    else:  # micro-batches in order; each loss weighted by its share, so the gradient is the batch's
        loss = 0.0
        for ids, (inputs, target) in ctx.micro_batches():
            part = ctx.program.loss(ctx.model(inputs), target) * (len(ids) / len(ctx.ids))
            part.backward()
            loss = loss + part.detach()
    metrics = {"loss": loss}
    if ctx.program.clip_grad_norm is not None:
        from .clipping import clip_grad_norm_

        metrics["grad_norm"] = clip_grad_norm_(ctx.model.parameters(), ctx.program.clip_grad_norm)
    ctx.optimizer.step()
    if ctx.ema is not None:
        ctx.ema.update()
    return metrics


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a step metric must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().item())
    return float(value)


class Engine:
    """A program's live training state and the means to advance it one step at a time."""

    def __init__(self, program: Program, contract: RngContract, order_spec=None, perturbations=()):
        self.program = program
        # A perturbation may re-seed a stream: the child's contract is the parent's, changed.
        self.perturbations = list(perturbations)
        for p in self.perturbations:
            contract = p.contract(contract)
        self.contract = contract
        self.policy = make_policy(program.order if order_spec is None else order_spec,
                                  program.dataset_size(), program.batch_size, contract)
        self.completed = 0
        # Checked before anything is built (or a run directory made), and for CUDA under the
        # deterministic settings from the start.
        self.device = device_module.prepare(program.device)
        # step -> a context manager around the step function (replay.trace's op tracer), or None
        self.step_context = None
        self._build()
        for p in self.perturbations:
            p.restore(self)

    @classmethod
    def contract_for(cls, program: Program, seed: int | None = None) -> RngContract:
        streams = tuple(BUILTIN_STREAMS) + tuple(s for s in program.streams if s not in BUILTIN_STREAMS)
        return RngContract(program.seed if seed is None else seed, streams)

    def _build(self) -> None:
        # Every factory runs with torch's generators seeded from the "init" stream.
        torch.manual_seed(self.contract.seed("init", 0))
        # Built on the CPU (the same initial bits on every device), then moved before the
        # optimizer, EMA and components are made from it, so their state lives there too.
        self.model = self.program.model().to(self.device)
        self.optimizer = self.program.optimizer(self.model)
        self.scheduler = self.program.scheduler(self.optimizer) if self.program.scheduler else None
        self.ema = EMA(self.model, self.program.ema_decay) if self.program.ema_decay is not None else None
        self.components = dict(self.program.components(self.model)) if self.program.components else {}

    # ------------------------------------------------------------------------ stepping ----

    def seed_step(self, step: int) -> dict[str, torch.Generator]:
        """Seed torch's (and Python's and numpy's) global generators for step `step` from the
        "dropout" stream; return the generators of the other streams. A perturbation active at
        the step may draw it from another contract (redraw: other draws over its window only)."""
        contract = self.contract_at(step)
        seed_all_globals(contract.seed("dropout", step))
        return contract.generators(step)

    def contract_at(self, step: int) -> RngContract:
        """The contract step `step` draws from: the run's, or a perturbation's for its window."""
        contract = self.contract
        for p in self.perturbations:
            if p.start <= step < p.end:
                contract = p.step_contract(contract, step)
        return contract

    def make_batch(self, step: int, ids: list[int]):
        """The batch of `step`. A tuple-of-tensors dataset is indexed (nothing is drawn); any
        other dataset's examples are built one by one, each with the global generators seeded
        by contract.example_seed(step, id), and the collate function after them with
        example_seed(step, "collate"): random augmentation in __getitem__ replays bit for bit
        from any checkpoint, in any process."""
        program = self.program
        if program.indexes_tensors:
            return program.make_batch(ids)
        contract = self.contract_at(step)
        examples = []
        for i in ids:
            seed_all_globals(contract.example_seed(step, i))
            examples.append(program.example(i))
        seed_all_globals(contract.example_seed(step, "collate"))
        return program.collate_examples(examples)

    def run_step(self) -> StepRecord:
        t = self.completed
        for p in self.perturbations:
            if t == p.start:
                p.check(self)
                p.apply(self)
        active = [p for p in self.perturbations if p.start <= t < p.end]
        ids = list(self.policy.batch_ids(t))
        for p in self.perturbations:
            ids = list(p.batch_ids(self, t, ids))
        epoch = self.policy.epoch_of(t)
        batch = device_module.to_device(self.make_batch(t, ids), self.device)
        generators = self.seed_step(t)
        tokens = [(p, p.begin_step(self, t)) for p in active]
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        ema_updates = self.ema.updates if self.ema is not None else 0
        ctx = StepContext(step=t, epoch=epoch, ids=ids, batch=batch, model=self.model,
                          optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema,
                          components=self.components, generators=generators, program=self.program)
        with self.step_context(t) if self.step_context is not None else contextlib.nullcontext():
            try:
                result = (self.program.step or default_step)(ctx)
            except RuntimeError as error:
                refused = device_module.nondeterministic_op(error)
                if refused is not None:
                    raise refused from error
                raise
            for p, token in reversed(tokens):  # undone before the scheduler reads the learning rate
                p.end_step(self, t, token)
            if self.scheduler is not None:
                self.scheduler.step()
        self.completed = t + 1
        metrics = {}
        if isinstance(result, torch.Tensor):
            metrics = {"loss": _as_float(result)}
        elif isinstance(result, dict):
            metrics = {str(k): _as_float(v) for k, v in result.items()}
        elif result is not None:
            raise TypeError(f"a step function returns a dict of metrics, a loss tensor or None, not {type(result).__name__}")
        fresh_ema = self.ema is not None and self.ema.updates != ema_updates
        fps = self.fingerprints(fresh_ema=fresh_ema)
        loss = metrics.pop("loss", None)
        return StepRecord(step=t, epoch=epoch, ids=ids, loss=loss, lr=None if lr is None else float(lr),
                          metrics=metrics, fingerprints=fps, digest=digest_of(fps))

    # -------------------------------------------------------------------- description ----

    def fingerprints(self, *, fresh_ema: bool = False, use_optimizer: bool = True) -> dict[str, dict[str, int]]:
        """Fingerprints of every component of the training state, by component and tensor.

        Where replay.optim's kernel fingerprinted the parameters and optimizer state in the step
        itself, those values are used (`use_optimizer`), and likewise the EMA's (`fresh_ema`);
        every other tensor of every component is hashed here, all in one kernel call (a call per
        component would cost more than the hashing on a small model)."""
        opt = self.optimizer
        from_kernel = use_optimizer and isinstance(opt, FusedOptimizerMixin) and opt.fingerprint
        kernel = opt.fingerprints if from_kernel else {}
        index_of = state_indices(opt.param_groups) if kernel or opt.state else {}
        # Tensors hashed here, by section: (the dict their fingerprints go into, [(name, tensor)]).
        # Each section's entries follow the ones already in its dict, as they always have.
        sections: list[tuple[dict[str, int], list[tuple[str, torch.Tensor]]]] = []

        model_fps: dict[str, int] = {}
        todo = []
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            # A parameter the step's kernel wrote has its fingerprint there (under every name a
            # tied parameter has: it is one tensor, with one fingerprint).
            entry = kernel.get(index_of.get(id(tensor))) if kernel else None
            if entry is not None:
                model_fps[name] = entry["param"]
            else:
                todo.append((name, tensor))
        sections.append((model_fps, todo))

        optimizer_fps: dict[str, int] = {}
        todo = []
        for p, state in opt.state.items():
            index = index_of.get(id(p))
            entry = kernel.get(index, {})
            for key, value in state.items():
                name = f"{index}.{key}"
                if key in entry:
                    optimizer_fps[name] = entry[key]
                elif isinstance(value, torch.Tensor):
                    todo.append((name, value))
                else:
                    optimizer_fps[name] = _json_hash(value)
        sections.append((optimizer_fps, todo))

        result = {"model": model_fps, "optimizer": optimizer_fps}
        if self.scheduler is not None:
            result["scheduler"] = {"state": _json_hash(flatten_state(self.scheduler.state_dict(), copy=False)[0])}
        if self.ema is not None:
            if fresh_ema:
                result["ema"] = dict(self.ema.fingerprints)
            else:
                result["ema"] = {}
                sections.append((result["ema"], list(self.ema.state_dict().items())))
        structures = {}
        for name, component in self.components.items():
            named, structures[f"component:{name}"] = _nested_parts(component.state_dict())
            result[f"component:{name}"] = {}
            sections.append((result[f"component:{name}"], named))

        hashed = iter(fingerprints([t for _, todo in sections for _, t in todo]))
        for entries, todo in sections:
            for name, _ in todo:
                entries[name] = next(hashed)
        # The groups as state_dict() gives them, without their parameter lists.
        optimizer_fps["_groups"] = _json_hash([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        for key, structure in structures.items():
            result[key]["_structure"] = structure
        return result

    def state_dict(self) -> dict:
        """The whole training state, for a checkpoint."""
        return {
            "format": CHECKPOINT_FORMAT,
            "completed_steps": self.completed,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "components": {name: c.state_dict() for name, c in self.components.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        missing = set(self.components) ^ set(state["components"])
        if missing:
            raise ValueError(f"checkpoint components {sorted(state['components'])} do not match the program's {sorted(self.components)}")
        self.completed = int(state["completed_steps"])
        for p in self.perturbations:  # e.g. a swapped optimizer must exist before its state loads
            p.restore(self)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        for name, component in self.components.items():  # each tensor back where the component keeps it
            component.load_state_dict(device_module.like(state["components"][name], component.state_dict()))


def digest_of(fps: dict[str, dict[str, int]]) -> int:
    """One 64-bit digest of all component fingerprints, independent of their order."""
    return combine_state((f"{component}/{name}", fp) for component, entries in fps.items() for name, fp in entries.items())
