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
import itertools
from dataclasses import dataclass, field

import torch

from . import device as device_module
from . import distributed
from .ema import EMA
from .fingerprinting import combine_state, fingerprints
from .optim._common import FusedOptimizerMixin, state_indices
from .order import make_policy
from .perturb import PerturbationRefused
from .precision import GradScaler, check_scaler_state, device_type, scaler_arguments
from .program import Program, StepContext, micro_batch_count
from .rng import BUILTIN_STREAMS, RngContract, seed_all_globals
from .store.encode import flatten_state
from .workers import BatchPlan, WorkerBatches, build_batch

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
    # In a run of several processes (replay.distributed): every rank's digest, in rank order,
    # and per rank > 0 whose state differs from rank 0's, the tensors by component.
    rank_digests: list[int] | None = None
    rank_differences: dict[int, dict[str, list[str]]] = field(default_factory=dict)


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
    """Forward and loss (under Program.autocast), backward (per micro-batch with
    Program.accumulate; of the scaled loss with Program.grad_scaler), the ranks' gradients
    summed (in a run of several processes: replay.distributed), unscaling, gradient
    clipping (with Program.clip_grad_norm), optimizer step (through the scaler, which skips it
    on inf or NaN gradients), scaler update, EMA update."""
    ctx.model.train()
    ctx.optimizer.zero_grad(set_to_none=True)
    scaler = ctx.scaler

    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if ctx.program.accumulate == 1:
        ctx.begin_micro_batch(0)
        inputs, target = ctx.batch
        with ctx.autocast():
            loss = ctx.program.loss(ctx.model(inputs), target)
            if ctx.world is not None and ctx.world.size > 1:  # this rank's share of the global batch
                loss = loss * (len(ctx.ids) / len(ctx.global_ids))
        backward(loss)
    else:  # micro-batches in order; each loss weighted by its share, so the gradient is the batch's
        loss = 0.0
        for index, (ids, (inputs, target)) in enumerate(ctx.micro_batches()):
            ctx.begin_micro_batch(index)
            with ctx.autocast():  # global_ids: the whole batch, also in a run of several processes
                part = ctx.program.loss(ctx.model(inputs), target) * (len(ids) / len(ctx.global_ids))
            backward(part)
            loss = loss + part.detach()
    ctx.synchronize_ranks()  # several processes: the gradients summed over the ranks, rank 0's buffers
    metrics = {"loss": loss}
    if scaler is not None:
        scaler.unscale_(ctx.optimizer)  # clipping acts on the true gradients
    if ctx.program.clip_grad_norm is not None:
        from .clipping import clip_grad_norm_

        metrics["grad_norm"] = clip_grad_norm_(ctx.model.parameters(), ctx.program.clip_grad_norm)
    if scaler is not None:
        scaler.step(ctx.optimizer)
        scaler.update()
    else:
        ctx.optimizer.step()
    if ctx.ema is not None:  # also after a skipped step, as the usual training loops do
        ctx.ema.update()
    return metrics


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a step metric must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().item())
    return float(value)


_engine_tokens = itertools.count()


class Engine:
    """A program's live training state and the means to advance it one step at a time."""

    def __init__(self, program: Program, contract: RngContract, order_spec=None, perturbations=()):
        self.program = program
        # A perturbation may re-seed a stream: the child's contract is the parent's, changed.
        self.perturbations = list(perturbations)
        self.base_contract = contract
        for p in self.perturbations:
            contract = p.contract(contract)
        self.contract = contract
        self.policy = make_policy(program.order if order_spec is None else order_spec,
                                  program.dataset_size(), program.batch_size, contract)
        # A run of several processes (replay.distributed), or None; this engine's identity and
        # whether its state was loaded since rank 0 last sent it to the other ranks.
        self.world = distributed.current()
        self.token = next(_engine_tokens)
        self.state_loaded = False
        self.completed = 0
        # Checked before anything is built (or a run directory made), and for CUDA under the
        # deterministic settings from the start.
        self.device = device_module.prepare(program.device)
        # step -> a context manager around the step function (replay.trace's op tracer), or None
        self.step_context = None
        self._worker_batches = None  # replay.workers.WorkerBatches, started with the first batch
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
        wrapped = ("Program.model must return the bare module, not a DistributedDataParallel: replay exchanges the "
                   "gradients itself, in a fixed order (replay.distributed), where DDP's bucketed allreduce would "
                   "add its own, with bits that change with its bucket layout")
        try:
            self.model = self.program.model().to(self.device)
        except ValueError as error:  # DDP's constructor, before replay joined the process group
            if self.world is not None and "process group has not been initialized" in str(error):
                raise distributed.DistributedError(f"{wrapped} ({error})") from error
            raise
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            raise distributed.DistributedError(wrapped)
        self.optimizer = self.program.optimizer(self.model)
        self.scheduler = self.program.scheduler(self.optimizer) if self.program.scheduler else None
        self.ema = EMA(self.model, self.program.ema_decay) if self.program.ema_decay is not None else None
        self.components = dict(self.program.components(self.model)) if self.program.components else {}
        arguments = scaler_arguments(self.program.grad_scaler)
        self.scaler = GradScaler(device_type(self.model), arguments) if arguments is not None else None

    # ------------------------------------------------------------------------ stepping ----

    def seed_step(self, step: int) -> dict[str, torch.Generator]:
        """Seed torch's (and Python's and numpy's) global generators for step `step` from the
        "dropout" stream; return the generators of the other streams. A perturbation active at
        the step may draw it from another contract (redraw: other draws over its window only)."""
        contract = self.contract_at(step)
        rank = self.world.rank if self.world is not None else 0  # each rank its own draws
        seed_all_globals(contract.seed("dropout", step, rank))
        return contract.generators(step, rank=rank)

    def contract_at(self, step: int) -> RngContract:
        """The contract step `step` draws from: the run's, or a perturbation's for its window."""
        contract = self.contract
        for p in self.perturbations:
            if p.start <= step < p.end:
                contract = p.step_contract(contract, step)
        return contract

    def batch_plan(self, step: int) -> BatchPlan:
        """What determines the batch of `step` (replay.workers.BatchPlan): its ids (the order
        policy, then any data-order perturbation) and, unless the dataset is a tuple of tensors
        that is only indexed, the seed of each example, contract.example_seed(step, id), and of
        the collate call, example_seed(step, "collate"). A pure function of the step."""
        ids = list(self.policy.batch_ids(step))
        for p in self.perturbations:
            ids = list(p.batch_ids(self, step, ids))
        return self.plan_of(step, ids)

    def rank_plan(self, step: int) -> BatchPlan:
        """The part of batch_plan(step) this process builds: all of it, or in a run of several
        processes this rank's contiguous share (replay.distributed.shard_bounds)."""
        return self.rank_share(self.batch_plan(step))

    def rank_share(self, plan: BatchPlan) -> BatchPlan:
        world = self.world
        if world is None or world.size == 1:
            return plan
        if len(plan.ids) < world.size:
            raise distributed.DistributedError(
                f"step {plan.step} has {len(plan.ids)} example(s), fewer than the {world.size} ranks: every rank "
                "needs at least one (a larger batch, or fewer processes)")
        a, b = distributed.shard_bounds(len(plan.ids), world.rank, world.size)
        seeds = plan.example_seeds
        return BatchPlan(plan.step, plan.ids[a:b], None if seeds is None else seeds[a:b], plan.collate_seed)

    def plan_of(self, step: int, ids) -> BatchPlan:
        """The plan of a batch of these ids at `step` (their seeds under the step's contract)."""
        ids = [int(i) for i in ids]
        if self.program.indexes_tensors:
            return BatchPlan(step, tuple(ids), None, None)
        contract = self.contract_at(step)
        return BatchPlan(step, tuple(ids), tuple(contract.example_seed(step, i) for i in ids),
                         contract.example_seed(step, "collate"))

    def make_batch(self, step: int, ids) -> object:
        """The batch of these example ids at `step`, built in this process (the same bits a
        worker would build: replay.workers.build_batch)."""
        return build_batch(self.program, self.plan_of(step, ids))

    def batch_from(self, plan: BatchPlan):
        """The batch of a step's plan (batch_plan(step)): built here (Program.workers = 0) or by
        a data-loader worker, the same bits either way (replay.workers). Each example is built with the global
        generators seeded from its seed, so random augmentation in __getitem__ replays bit for
        bit from any checkpoint, in any process."""
        if self.program.workers == 0:
            return build_batch(self.program, plan)
        return self._workers().batch(plan)

    def start_workers(self) -> None:
        """Start the data-loader workers now (Program.workers > 0), prefetching from the step the
        engine is at, rather than with the first batch."""
        if self.program.workers > 0:
            self._workers().start(self.completed)

    def _workers(self) -> WorkerBatches:
        if self._worker_batches is None:
            self._worker_batches = WorkerBatches(self, self.program.workers)
        return self._worker_batches

    def close(self) -> None:
        """Stop the data-loader workers, if any (they also stop when the engine is collected)."""
        if self._worker_batches is not None:
            self._worker_batches.close()
            self._worker_batches = None

    def run_step(self) -> StepRecord:
        t = self.completed
        world = self.world
        starting = [p for p in self.perturbations if t == p.start]
        for p in starting:
            p.check(self)
        # The plan is a pure function of the step (applying a perturbation does not change it),
        # made once: rank 0 refuses too small a batch before the other ranks start the step.
        plan = self.batch_plan(t)
        global_ids = list(plan.ids)
        plan = self.rank_share(plan)
        ids = list(plan.ids)
        if world is not None and world.leader:
            distributed.lead_step(world, self)
        mid_step: dict[int, list] = {}  # micro-batch index -> perturbations applied just before it
        for p in starting:
            if p.micro_step is None:
                p.apply(self)
            else:
                mid_step.setdefault(p.micro_step, []).append(p)
        active = [p for p in self.perturbations if p.start <= t < p.end]
        parts = micro_batch_count(self.program.accumulate, len(ids))
        for index, ps in mid_step.items():
            if index >= parts:
                raise PerturbationRefused(f"{ps[0].name}: micro_step {index}, but step {t} has {parts} micro-batch(es) "
                                          f"(Program.accumulate = {self.program.accumulate}, {len(ids)} examples)")
        epoch = self.policy.epoch_of(t)
        batch = device_module.to_device(self.batch_from(plan), self.device)
        generators = self.seed_step(t)
        tokens = [(p, p.begin_step(self, t)) for p in active]
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        ema_updates = self.ema.updates if self.ema is not None else 0
        ctx = StepContext(step=t, epoch=epoch, ids=ids, batch=batch, model=self.model,
                          optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema,
                          components=self.components, generators=generators, program=self.program,
                          micro_hooks={i: [p.apply_to(self) for p in ps] for i, ps in mid_step.items()},
                          scaler=self.scaler, global_ids=global_ids, world=world)
        if isinstance(self.optimizer, FusedOptimizerMixin):
            # A step in which the optimizer does not run (a scaler skipped it) must not report
            # the kernel's fingerprints of an earlier step: state may have changed since (a
            # perturbation, a restore), and the engine hashes it afresh when there are none.
            self.optimizer.clear_fingerprints()
        if self.scaler is not None:
            self.scaler.skipped = False
            loss_scale = self.scaler.get_scale()
        with self.step_context(t) if self.step_context is not None else contextlib.nullcontext():
            try:
                result = (self.program.step or default_step)(ctx)
            except RuntimeError as error:
                refused = device_module.nondeterministic_op(error)
                if refused is not None:
                    raise refused from error
                raise
            if ctx.micro_hooks:
                index = min(ctx.micro_hooks)
                raise PerturbationRefused(
                    f"{mid_step[index][0].name}: micro_step {index} never began: the step function did not call "
                    f"ctx.begin_micro_batch({index}) (the default step does; a custom step must, before each "
                    "micro-batch, for a fork to act on one)")
            if world is not None and world.size > 1 and not ctx.ranks_synchronized:
                raise distributed.DistributedError(
                    f"step {t}: the step function never called ctx.synchronize_ranks() (the default step does; a "
                    "custom step must, after its backward passes and before the optimizer step, in a run of "
                    "several processes); the ranks' gradients were not summed")
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
        if self.scaler is not None:
            reserved = {"loss_scale", "scaler_skipped"} & set(metrics)
            if reserved:
                raise ValueError(f"step metrics {sorted(reserved)} are the engine's own with Program.grad_scaler; rename them")
            metrics["loss_scale"] = loss_scale
            metrics["scaler_skipped"] = float(self.scaler.skipped)
        fresh_ema = self.ema is not None and self.ema.updates != ema_updates
        fps = self.fingerprints(fresh_ema=fresh_ema)
        loss = metrics.pop("loss", None)
        digest = digest_of(fps)
        rank_digests, rank_differences = None, {}
        if world is not None:
            loss, rank_digests, rank_differences = distributed.gather_step(world, fps, digest, loss)
            world.followers_waiting = True
        return StepRecord(step=t, epoch=epoch, ids=global_ids, loss=loss, lr=None if lr is None else float(lr),
                          metrics=metrics, fingerprints=fps, digest=digest, rank_digests=rank_digests,
                          rank_differences=rank_differences)

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
        if self.scaler is not None:
            result["scaler"] = self.scaler.fingerprints(_json_hash)
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
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        missing = set(self.components) ^ set(state["components"])
        if missing:
            raise ValueError(f"checkpoint components {sorted(state['components'])} do not match the program's {sorted(self.components)}")
        if self.scaler is None and state.get("scaler") is not None:
            raise ValueError("the checkpoint holds GradScaler state, but the program has no Program.grad_scaler")
        scaler_state = check_scaler_state(state.get("scaler"), self.scaler.arguments) if self.scaler is not None else None
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
        if self.scaler is not None:
            self.scaler.load_state_dict(scaler_state)
        self.state_loaded = True  # rank 0 sends it to the other ranks before the next step


def digest_of(fps: dict[str, dict[str, int]]) -> int:
    """One 64-bit digest of all component fingerprints, independent of their order."""
    return combine_state((f"{component}/{name}", fp) for component, entries in fps.items() for name, fp in entries.items())
