"""Sessions over a run directory (rr's vocabulary): RecordSession writes a run (and resumes
one that stopped), ReplaySession re-executes any stretch of it from the nearest checkpoint and
says where, and in which tensors, the replay diverges from the ledger."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import environment as env_module
from .engine import Engine, StepRecord, digest_of
from .order import batch_hash
from .program import Program, ProgramSource, file_sha256, load_program
from .rng import RngContract
from .schedule import checkpoint_counts
from .store import RunDir, RunError, StepRow

MANIFEST_FORMAT = "replay.run"
MANIFEST_VERSION = 1


class ReplayRefused(RunError):
    """A replay or resume that would not reproduce the recording (changed program source or
    environment) and was not explicitly allowed."""


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def _row(record: StepRecord) -> StepRow:
    return StepRow(step=record.step, epoch=record.epoch, batch_ids=record.ids, batch_hash=batch_hash(record.ids),
                   loss=record.loss, lr=record.lr, metrics=record.metrics, fingerprints=record.fingerprints,
                   digest=record.digest)


def _is_replay_optimizer(optimizer) -> bool:
    return type(optimizer).__module__.startswith("replay.")


# ---------------------------------------------------------------------------- record ----


class RecordSession:
    """Record a program into a new run directory, or continue one that stopped.

    >>> RecordSession("examples/digits_mlp.py:program", "runs/mlp", seed=1, steps=300).run()
    """

    def __init__(self, reference: str, out: str | os.PathLike, *, seed: int | None = None,
                 steps: int | None = None, checkpoint_every: int | None = None,
                 checkpoint_log_spaced: bool | None = None, progress: bool = True):
        program, source = load_program(reference)
        self.program = program.with_overrides(seed=seed, steps=steps, checkpoint_every=checkpoint_every,
                                              checkpoint_log_spaced=checkpoint_log_spaced)
        self.source = source
        self.out = Path(out)
        self.progress = progress

    def _manifest(self, engine: Engine) -> dict:
        p = self.program
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "run_id": uuid.uuid4().hex,
            "first_step": 0,
            "status": "incomplete",
            "program": {"reference": self.source.reference, "path": self.source.path, "sha256": self.source.sha256,
                        "description": p.description},
            "seed": p.seed,
            "steps": p.steps,
            "batch_size": p.batch_size,
            "dataset_size": p.dataset_size(),
            "rng": engine.contract.to_json(),
            "order": engine.policy.to_json(),
            "checkpoints": {"every": p.checkpoint_every, "log_spaced": p.checkpoint_log_spaced,
                            "counts": checkpoint_counts(p.steps, p.checkpoint_every, p.checkpoint_log_spaced)},
            "optimizer": {"class": f"{type(engine.optimizer).__module__}.{type(engine.optimizer).__qualname__}",
                          "replay_kernel": _is_replay_optimizer(engine.optimizer),
                          "numerics": getattr(engine.optimizer, "numerics", None)},
            "environment": env_module.environment(),
        }

    def run(self, observe=None) -> Path:
        """Record the run; `observe(engine)` is called after every step."""
        engine = Engine(self.program, Engine.contract_for(self.program))
        if observe is not None:
            observe(engine)
        with RunDir.create(self.out, self._manifest(engine)) as run:
            _record_steps(run, engine, self.program.steps, self.progress, observe)
        return self.out

    @staticmethod
    def resume(run_dir: str | os.PathLike, *, progress: bool = True, allow_source_change: bool = False,
               allow_environment_change: bool = False) -> Path:
        """Continue a recording that stopped or crashed from its last checkpoint. The result is
        bit-identical to a recording that never stopped."""
        with RunDir.open(run_dir, writable=True) as run:
            if run.is_complete:
                raise RunError(f"{run_dir}: the recording is already complete; nothing to resume")
            program = _program_for_run(run, allow_source_change, allow_environment_change, "resume")
            engine = engine_for_run(run, program)
            start = run.latest_checkpoint_at_or_before(program.steps)
            if start is None:
                raise RunError(f"{run_dir}: no checkpoint recorded; record the run again")
            engine.load_state_dict(run.load_checkpoint(start))
            _check_restored_state(run, engine, start)
            run.ledger.truncate_after(start - 1, keep_checkpoint=start)
            run.ledger.add_event("resume", {"from_checkpoint": start})
            _record_steps(run, engine, program.steps, progress)
        return Path(run_dir)


class _CheckpointWriter:
    """Writes checkpoints on a background thread while training goes on, and records each in the
    ledger (on the calling thread) once its files are durable.

    The state is copied when the checkpoint is due, so later steps cannot change it. Rows come
    first, then the checkpoint: a checkpoint is only recorded once every row before it is
    durable, so a resume from it never lacks a row; a crash before the record leaves a complete
    but unrecorded folder, which is ignored. At most one checkpoint is in flight.
    """

    def __init__(self, run: RunDir):
        from concurrent.futures import ThreadPoolExecutor

        self.run = run
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-checkpoint")
        self.in_flight: tuple[int, object] | None = None

    def submit(self, step: int, state: dict) -> None:
        import copy

        from .store.checkpoint import write_checkpoint

        self.collect(block=True)
        if self.run.ledger.checkpoint_files(step) is not None:
            self.run.ledger.remove_checkpoint(step)
        snapshot = copy.deepcopy(state)
        self.in_flight = (step, self.pool.submit(write_checkpoint, self.run.checkpoints_dir, step, snapshot))

    def collect(self, block: bool = False) -> None:
        if self.in_flight is None:
            return
        step, future = self.in_flight
        if block or future.done():
            self.in_flight = None
            self.run.ledger.record_checkpoint(step, future.result())

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _record_steps(run: RunDir, engine: Engine, total: int, progress: bool, observe=None) -> None:
    """Run the engine to `total` completed steps, writing ledger rows and checkpoints (including
    one at the current step if it is due and not yet recorded); `observe` (if given) is called
    with the engine after every step (experiments evaluate probes there)."""
    counts = set(run.manifest["checkpoints"]["counts"])
    bar = _progress(total - engine.completed, "record", progress)
    pending: list[StepRow] = []
    known_epochs = run.ledger.epochs()
    writer = _CheckpointWriter(run)
    try:
        if engine.completed in counts and engine.completed not in run.ledger.checkpoints():
            writer.submit(engine.completed, engine.state_dict())
        while engine.completed < total:
            record = engine.run_step()
            if observe is not None:
                observe(engine)
            pending.append(_row(record))
            if record.epoch not in known_epochs:
                order_hash = engine.policy.epoch_order_hash(record.epoch)
                if order_hash is not None:
                    run.ledger.record_epoch(record.epoch, order_hash)
                known_epochs[record.epoch] = order_hash
            if engine.completed in counts:
                run.ledger.append_steps(pending)
                pending = []
                writer.submit(engine.completed, engine.state_dict())
            writer.collect()
            if bar is not None:
                bar.update(1)
                if record.loss is not None:
                    bar.set_postfix(loss=f"{record.loss:.4f}", refresh=False)
        run.ledger.append_steps(pending)
        writer.collect(block=True)
        run.mark_complete()
    finally:
        writer.close()
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------- replay ----


@dataclass
class Divergence:
    """Where a replay first parts from the ledger: the step, and per component the tensors whose
    fingerprints differ ({} for the batch when only the data differs)."""

    step: int
    components: dict[str, list[str]] = field(default_factory=dict)
    batch: bool = False
    loss: tuple[float | None, float | None] | None = None

    def describe(self) -> str:
        lines = [f"first divergence at step {self.step}"]
        if self.batch:
            lines.append("  batch ids differ")
        for component, names in sorted(self.components.items()):
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} tensors)" if len(names) > 8 else "")
            lines.append(f"  {component}: {shown}")
        if self.loss is not None:
            lines.append(f"  loss recorded {self.loss[0]!r}, replayed {self.loss[1]!r}")
        return "\n".join(lines)


@dataclass
class VerifyReport:
    start: int
    end: int
    restored_from: int
    divergence: Divergence | None

    @property
    def ok(self) -> bool:
        return self.divergence is None


def compare_fingerprints(recorded: dict[str, dict[str, int]], replayed: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """Per component, the tensor names whose fingerprints differ (or exist on one side only)."""
    differing: dict[str, list[str]] = {}
    for component in sorted(set(recorded) | set(replayed)):
        a, b = recorded.get(component, {}), replayed.get(component, {})
        names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
        if names:
            differing[component] = names
    return differing


def compare_record(row: StepRow, record: StepRecord) -> Divergence | None:
    differing = compare_fingerprints(row.fingerprints, record.fingerprints)
    batch = row.batch_ids != record.ids
    loss_differs = not _same_float(row.loss, record.loss)
    if differing or batch or loss_differs or row.digest != record.digest:
        return Divergence(step=row.step, components=differing, batch=batch,
                          loss=(row.loss, record.loss) if loss_differs else None)
    return None


def _same_float(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return torch.tensor(a, dtype=torch.float64).view(torch.int64).item() == torch.tensor(b, dtype=torch.float64).view(torch.int64).item()


def _program_for_run(run: RunDir, allow_source_change: bool, allow_environment_change: bool, action: str) -> Program:
    manifest = run.manifest
    reference = manifest["program"]["reference"]
    program, source = load_program(reference)
    if source.sha256 != manifest["program"]["sha256"]:
        if not allow_source_change:
            raise ReplayRefused(
                f"the program source {source.path} changed since {run.path} was recorded "
                f"(sha256 {manifest['program']['sha256'][:12]}... then, {source.sha256[:12]}... now); "
                "a replay would not reproduce the recording. Restore the file, or allow the change "
                "explicitly (--allow-source-change), which the run records."
            )
        run.ledger.add_event(f"{action}:source_change_allowed", {"recorded": manifest["program"]["sha256"], "now": source.sha256})
    diffs = env_module.differences(manifest["environment"], env_module.environment())
    if diffs:
        if not allow_environment_change:
            shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diffs.items())
            raise ReplayRefused(
                f"the environment differs from the one {run.path} was recorded in ({shown}); "
                "the bits may legitimately differ. Match it, or allow the change explicitly "
                "(--allow-environment-change), which the run records."
            )
        run.ledger.add_event(f"{action}:environment_change_allowed", {k: list(v) for k, v in diffs.items()})
    return program_as_recorded(program, manifest)


def program_as_recorded(program: Program, manifest: dict) -> Program:
    """The program with the seed, length and checkpoint schedule the run was recorded with."""
    return program.with_overrides(seed=manifest["seed"], steps=manifest["steps"],
                                  checkpoint_every=manifest["checkpoints"]["every"],
                                  checkpoint_log_spaced=manifest["checkpoints"]["log_spaced"])


def engine_for_run(run: RunDir, program: Program) -> Engine:
    """An engine for a recorded run: its RNG contract, its order policy and, for a fork, its
    perturbations."""
    from .perturb import from_spec

    perturbations = [from_spec(spec) for spec in run.manifest.get("lineage", {}).get("perturbations", [])]
    return Engine(program, RngContract.from_json(run.manifest["rng"]), run.manifest["order"], perturbations)


def _check_restored_state(run: RunDir, engine: Engine, count: int) -> None:
    """A restored checkpoint must describe the same state the ledger recorded after that step."""
    if count == 0:
        return
    row = run.ledger.step_row(count - 1)
    if row is None:
        return
    restored = engine.fingerprints(use_optimizer=False)
    differing = compare_fingerprints(row.fingerprints, restored)
    if differing:
        raise RunError(
            f"{run.path}: checkpoint {count} does not match the ledger's fingerprints after step {count - 1} "
            f"({Divergence(count - 1, differing).describe()})"
        )


class ReplaySession:
    """Re-execute a recorded run from its checkpoints and compare every step with the ledger."""

    def __init__(self, run_dir: str | os.PathLike, *, allow_source_change: bool = False,
                 allow_environment_change: bool = False):
        self.path = Path(run_dir)
        self.allow_source_change = allow_source_change
        self.allow_environment_change = allow_environment_change

    def verify(self, start: int | None = None, end: int | None = None, *, progress: bool = True) -> VerifyReport:
        """Replay steps [start, end) (default: every recorded step) and report the first
        divergence, if any."""
        writable = self.allow_source_change or self.allow_environment_change
        with RunDir.open(self.path, writable=writable) as run:
            program = _program_for_run(run, self.allow_source_change, self.allow_environment_change, "verify")
            last = run.ledger.last_step()
            if last is None:
                raise RunError(f"{self.path}: the ledger has no steps to verify")
            first = run.manifest.get("first_step", 0)
            start = first if start is None else start
            end = last + 1 if end is None else end
            if not first <= start < end <= last + 1:
                raise ValueError(f"cannot verify steps [{start}, {end}): the ledger holds steps {first}..{last}")
            restore = run.latest_checkpoint_at_or_before(start)
            if restore is None:
                raise RunError(f"{self.path}: no checkpoint at or before step {start}")
            engine = engine_for_run(run, program)
            engine.load_state_dict(run.load_checkpoint(restore))
            _check_restored_state(run, engine, restore)
            rows = {r.step: r for r in run.ledger.rows(restore, end)}
            bar = _progress(end - restore, "verify", progress)
            divergence = None
            try:
                while engine.completed < end:
                    record = engine.run_step()
                    if record.step >= start:
                        divergence = compare_record(rows[record.step], record)
                        if divergence is not None:
                            break
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
            return VerifyReport(start=start, end=end, restored_from=restore, divergence=divergence)
