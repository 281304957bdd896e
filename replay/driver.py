"""The run driver: everything that turns a run directory and a program into a live engine and
back. RecordSession, ReplaySession (session.py) and ForkSession (fork.py) are thin layers over it.

* ``load_run_program``   the program a run names, executed only once its file hashes as recorded
* ``engine_for_run``     an engine under the run's RNG contract, order policy and perturbations
* ``restore``            an engine at a checkpoint, checked against the ledger
* ``record_steps``       run an engine forward, writing ledger rows and checkpoints
* ``root_manifest`` / ``child_manifest``   every manifest is built here
* ``compare_record`` / ``state_differences``   where a replay parts from what was recorded
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import device as device_module
from . import environment as env_module
from .engine import Engine, StepRecord, nested_fingerprints
from .order import batch_hash
from .program import Program, ProgramSource, load_program, resolve_reference
from .rng import RngContract
from .schedule import checkpoint_counts
from .store import CorruptRunError, RunDir, RunError, StepRow

MANIFEST_FORMAT = "replay.run"
MANIFEST_VERSION = 1

__all__ = [
    "MANIFEST_FORMAT", "MANIFEST_VERSION", "Divergence", "ReplayRefused", "check_restored_state",
    "child_manifest", "compare_fingerprints", "compare_record", "dropped_from_start", "engine_for_run", "fresh_engine",
    "load_run_program", "progress_bar", "program_as_recorded", "record_steps", "restore",
    "root_manifest", "state_differences",
]


class ReplayRefused(RunError):
    """A replay or resume that would not reproduce the recording (changed program source,
    environment or device kind) and was not explicitly allowed."""


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


# -------------------------------------------------------------------------- programs ----


def load_run_program(run: RunDir, allow_source_change: bool, allow_environment_change: bool,
                     action: str, *, allow_device_change: bool = False,
                     device: str | None = None) -> tuple[Program, str]:
    """The program `run` was recorded with (its seed, length, schedule and device: `device`
    if given, else the recorded one) and the SHA-256 of the source it was loaded from.

    Nothing is executed before the checks: the reference is resolved to its file without
    importing it, the file must lie outside the run directory, the file's hash is compared with the manifest's (ReplayRefused unless
    `allow_source_change`), the device kind is compared (ReplayRefused unless
    `allow_device_change`), the device must exist here, the environment is compared
    (ReplayRefused unless `allow_environment_change`; on an allowed device change the keys the
    device sets are the device's business), the attribute must be defined in that file, and
    only then is the file executed. An allowed change is recorded as an event (the run must be
    writable)."""
    manifest = run.manifest
    check_world_size(run)
    recorded = manifest["program"]
    resolved = resolve_reference(recorded["reference"])
    run_root = os.path.realpath(run.path)
    if os.path.commonpath([os.path.realpath(resolved.path), run_root]) == run_root:
        raise ReplayRefused(
            f"{run.path}: the program reference {recorded['reference']!r} names {resolved.path}, a file inside the "
            "run directory; a run's own files are never executed (a run names code, it does not carry it)"
        )
    if resolved.sha256 != recorded["sha256"]:
        if not allow_source_change:
            raise ReplayRefused(
                f"the program source {resolved.path} changed since {run.path} was recorded "
                f"(sha256 {recorded['sha256'][:12]}... then, {resolved.sha256[:12]}... now); "
                "a replay would not reproduce the recording, and the file was not executed. Restore the "
                "file, or allow the change explicitly (--allow-source-change), which the run records."
            )
        run.ledger.add_event(f"{action}:source_change_allowed", {"recorded": recorded["sha256"], "now": resolved.sha256})
    target = check_device(run, action, allow_device_change, device)
    # The deterministic settings are applied before the environment is read: it records them.
    device_module.prepare(target)
    diffs = env_module.differences(manifest["environment"], env_module.environment(device_module.kind_of(target)))
    if device_module.kind_of(target) != device_module.recorded_device(manifest)["kind"]:
        diffs = {k: v for k, v in diffs.items() if k not in device_module.DEVICE_ENVIRONMENT_KEYS}
    if diffs:
        if not allow_environment_change:
            shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diffs.items())
            raise ReplayRefused(
                f"the environment differs from the one {run.path} was recorded in ({shown}); "
                "the bits may legitimately differ. Match it, or allow the change explicitly "
                "(--allow-environment-change), which the run records."
            )
        run.ledger.add_event(f"{action}:environment_change_allowed", {k: list(v) for k, v in diffs.items()})
    program, source = load_program(recorded["reference"], expected_sha256=resolved.sha256)
    return program_as_recorded(program, manifest, device=target), source.sha256


def check_device(run: RunDir, action: str, allow_device_change: bool, device: str | None) -> str:
    """The device a replay of `run` runs on: `device` if given (checked), else the one the run
    was recorded on. Another kind than the recorded one is refused unless `allow_device_change`
    (then recorded as an event): replay's own ops give the same bits on every device, torch's
    GEMMs and convolutions do not. DeviceUnavailable if the device does not exist here."""
    recorded = device_module.recorded_device(run.manifest)
    target = recorded["device"] if device is None else device_module.check_spec(device)
    kind = device_module.kind_of(target)
    changed = kind != recorded["kind"]
    if changed and not allow_device_change:
        raise ReplayRefused(
            f"{run.path} was recorded on {device_module.label(recorded)} and would be replayed on {kind} ({target}); torch's "
            "matrix products and convolutions give other bits on another kind of device, so a replay "
            f"would not reproduce the recording. Replay it on {recorded['kind']}, or allow the change "
            "explicitly (--allow-device-change), which the run records; verify then reports the first "
            "divergence, if any.")
    try:
        device_module.check_available(target)
    except device_module.DeviceUnavailable as error:
        if device is not None:
            raise
        raise device_module.DeviceUnavailable(
            f"{run.path} was recorded on {target}: {error} (--device names another device of the same kind; "
            "--device cpu --allow-device-change replays on the CPU, without the promise of the same bits)") from None
    if changed:
        run.ledger.add_event(f"{action}:device_change_allowed", {"recorded": recorded, "now": target})
    return target


def program_as_recorded(program: Program, manifest: dict, device: str | None = None) -> Program:
    """The program with the seed, length and checkpoint schedule the run was recorded with, on
    `device` (default: the one the run was recorded on)."""
    return program.with_overrides(seed=manifest["seed"], steps=manifest["steps"],
                                  checkpoint_every=manifest["checkpoints"]["every"],
                                  checkpoint_log_spaced=manifest["checkpoints"]["log_spaced"],
                                  device=device or device_module.recorded_device(manifest)["device"])


def engine_for_run(run: RunDir | dict, program: Program, extra_perturbations=()) -> Engine:
    """An engine for a recorded run (a RunDir or its manifest): its RNG contract, its order
    policy and, for a fork, its perturbations (then `extra_perturbations`)."""
    from .perturb import from_spec

    manifest = run if isinstance(run, dict) else run.manifest
    perturbations = [from_spec(spec) for spec in manifest.get("lineage", {}).get("perturbations", [])]
    return Engine(program, RngContract.from_json(manifest["rng"]), manifest["order"],
                  dropped_from_start(manifest.get("dropped_examples")) + perturbations + list(extra_perturbations))


def dropped_from_start(ids) -> list:
    """The perturbation of a recording that leaves examples out of every batch from step 0
    (`replay record --drop-examples`): [] when no ids are given."""
    from .perturb import from_spec

    return [from_spec({"name": "drop_examples", "ids": list(ids)}, start=0)] if ids else []


def fresh_engine(run: RunDir, program: Program) -> Engine:
    """The state before step 0 of a root run, rebuilt from the program alone."""
    if run.manifest.get("lineage"):
        raise RunError(f"{run.path}: a fork has no fresh state; it starts from its parent")
    return engine_for_run(run, program)


# ------------------------------------------------------------------------- manifests ----


def _common(engine: Engine) -> dict:
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "run_id": uuid.uuid4().hex,
            "device": device_module.describe(engine.device),
            "environment": env_module.environment(engine.device.type)}


def distributed_manifest(engine: Engine) -> dict:
    """The manifest's "distributed" entry for a run of several processes ({} for one)."""
    if engine.world is None:
        return {}
    return {"distributed": {"world_size": engine.world.size, "backend": "gloo",
                            "gradients": "gathered, summed in rank order",
                            "buffers": "rank 0's, after the backward passes"}}


def check_world_size(run: RunDir) -> None:
    """A run is replayed, resumed and forked by as many processes as recorded it: the shards,
    each rank's random draws and the order of the gradient sum depend on the world size.
    DistributedError (a clear refusal) otherwise."""
    from .distributed import DistributedError, current

    recorded = run.manifest.get("distributed", {}).get("world_size")
    world = current()
    now = world.size if world is not None else None
    if recorded == now:
        return
    if recorded is None:
        raise DistributedError(f"{run.path} was recorded by one process; replay, resume and fork it the same way "
                               f"(without --nproc or --distributed), not by {now}")
    how = (f"--nproc {recorded} (or torchrun --nproc-per-node {recorded} ... --distributed): verify, resume "
           "and fork take it; check, trace and forget run one process and cannot replay such a run")
    got = "one process" if now is None else f"a world of {now}"
    raise DistributedError(f"{run.path} was recorded by {recorded} processes (world size {recorded}) and would be "
                           f"run by {got}: each rank's share of a batch, its random draws and the order of the "
                           f"gradient sum depend on the world size, so the bits would differ. Run it with {how}.")


def root_manifest(program: Program, source: ProgramSource, engine: Engine, dropped_examples=(),
                  trace_steps=()) -> dict:
    """The manifest of a new recording of `program` (loaded from `source`), leaving
    `dropped_examples` out of every batch and tracing `trace_steps` op by op."""
    optimizer = engine.optimizer
    return {
        **({"dropped_examples": sorted(set(dropped_examples))} if dropped_examples else {}),
        **({"trace_steps": sorted(set(trace_steps))} if trace_steps else {}),
        # with the ledger's batch ids, what determines each step's micro-batches (StepContext.micro_batches)
        **({"accumulate": program.accumulate} if program.accumulate > 1 else {}),
        **distributed_manifest(engine),
        **_common(engine),
        "first_step": 0,
        "status": "incomplete",
        "program": {"reference": source.reference, "path": source.path, "sha256": source.sha256,
                    "description": program.description},
        "seed": program.seed,
        "steps": program.steps,
        "batch_size": program.batch_size,
        "dataset_size": program.dataset_size(),
        "rng": engine.contract.to_json(),
        "order": engine.policy.to_json(),
        "checkpoints": {"every": program.checkpoint_every, "log_spaced": program.checkpoint_log_spaced,
                        "counts": checkpoint_counts(program.steps, program.checkpoint_every,
                                                    program.checkpoint_log_spaced)},
        "optimizer": {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
                      "replay_kernel": type(optimizer).__module__.startswith("replay."),
                      "numerics": getattr(optimizer, "numerics", None)},
    }


def child_manifest(parent: dict, parent_path: Path, out: Path, parent_digest: str, at: int, end: int,
                   engine: Engine, perturbations) -> dict:
    """The manifest of a child of the run `parent` (its manifest) forked at step `at`, running
    to `end` with `perturbations`."""
    schedule = parent["checkpoints"]
    counts = sorted({at, end} | {c for c in checkpoint_counts(end, schedule["every"], schedule["log_spaced"])
                                 if at < c < end})
    parent_lineage = parent.get("lineage", {})
    return {
        **{k: v for k, v in parent.items() if k not in ("status", "store_version", "trace_steps")},
        **_common(engine),
        "first_step": at,
        "steps": end,
        "checkpoints": {**schedule, "counts": counts},
        "rng_effective": engine.contract.to_json(),
        "lineage": {
            "parent_id": parent.get("run_id"),
            "parent_path": os.path.relpath(Path(parent_path).resolve(), Path(out).resolve().parent),
            "parent_digest": parent_digest,
            "fork_step": at,
            "window": [at, max(p.end for p in perturbations)],
            "perturbations": parent_lineage.get("perturbations", []) + [p.to_json() for p in perturbations],
            "depth": parent_lineage.get("depth", 0) + 1,
        },
    }


# ------------------------------------------------------------------------ comparison ----


@dataclass
class Divergence:
    """Where a replay first parts from the ledger: the step, and per component the tensors whose
    fingerprints differ ({} for the batch when only the data differs)."""

    step: int
    components: dict[str, list[str]] = field(default_factory=dict)
    batch: bool = False
    loss: tuple[float | None, float | None] | None = None
    # A run of several processes: rank -> what parted there. The tensors (by component) in
    # which the rank's state differs from rank 0's, or {} when only its digest differs from the
    # recorded one.
    ranks: dict[int, dict[str, list[str]]] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"first divergence at step {self.step}"]
        if self.batch:
            lines.append("  batch ids differ")
        for component, names in sorted(self.components.items()):
            lines.append(f"  {component}: {_shown(names)}")
        for rank, parts in sorted(self.ranks.items()):
            if parts:
                lines.append(f"  rank {rank}: its state differs from rank 0's in {_shown_parts(parts)}")
            else:
                lines.append(f"  rank {rank}: its digest differs from the recorded one")
        if self.loss is not None:
            lines.append(f"  loss recorded {self.loss[0]!r}, replayed {self.loss[1]!r}")
        return "\n".join(lines)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f", ... ({len(names)} tensors)" if len(names) > 8 else "")


def _shown_parts(parts: dict[str, list[str]]) -> str:
    """Tensors by component: "model: a, b; optimizer: c"."""
    return "; ".join(f"{c}: {_shown(n)}" for c, n in sorted(parts.items()))


def compare_fingerprints(recorded: dict[str, dict[str, int]], replayed: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """Per component, the tensor names whose fingerprints differ (or exist on one side only)."""
    differing: dict[str, list[str]] = {}
    for component in sorted(set(recorded) | set(replayed)):
        a, b = recorded.get(component, {}), replayed.get(component, {})
        names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
        if names:
            differing[component] = names
    return differing


def _same_float(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    import struct

    return struct.pack("<d", a) == struct.pack("<d", b)


def compare_record(row: StepRow, record: StepRecord) -> Divergence | None:
    differing = compare_fingerprints(row.fingerprints, record.fingerprints)
    batch = row.batch_ids != record.ids
    loss_differs = not _same_float(row.loss, record.loss)
    ranks = dict(record.rank_differences)
    recorded, replayed = row.rank_digests or [], record.rank_digests or []
    for rank in range(1, max(len(recorded), len(replayed))):
        if rank not in ranks and (recorded[rank:rank + 1] != replayed[rank:rank + 1]):
            ranks[rank] = {}
    if differing or batch or loss_differs or ranks or row.digest != record.digest:
        return Divergence(step=row.step, components=differing, batch=batch,
                          loss=(row.loss, record.loss) if loss_differs else None, ranks=ranks)
    return None


def state_differences(stored: dict, replayed: dict) -> dict[str, list[str]]:
    """Per top-level part of a checkpoint state (model, optimizer, ...), the entries whose bits
    differ between a stored checkpoint and the replayed state ("_structure" for everything that
    is not a tensor)."""
    differing = {}
    for key in sorted(set(stored) | set(replayed)):
        a, b = stored.get(key), replayed.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names = compare_fingerprints({key: nested_fingerprints(a)}, {key: nested_fingerprints(b)}).get(key)
            if names:
                differing[key] = names
        elif nested_fingerprints({"v": a}) != nested_fingerprints({"v": b}):
            differing[key] = ["_value"]
    return differing


def check_restored_state(run: RunDir, engine: Engine, count: int) -> None:
    """A restored checkpoint must describe the same state the ledger recorded after that step."""
    if count == 0 or count == run.manifest.get("first_step", 0):
        return
    row = run.ledger.step_row(count - 1)
    if row is None:
        return
    restored = engine.fingerprints(use_optimizer=False)
    differing = compare_fingerprints(row.fingerprints, restored)
    if differing:
        raise CorruptRunError(
            os.path.join(run.checkpoints_dir, f"step-{count:08d}"),
            f"checkpoint {count} does not match the ledger's fingerprints after step {count - 1} "
            f"({Divergence(count - 1, differing).describe()})"
        )


def restore(run: RunDir, engine: Engine, step: int) -> None:
    """Load the recorded checkpoint of `step` into `engine` and check it against the ledger
    (CorruptRunError naming the file or folder if it is damaged or disagrees)."""
    state = run.load_checkpoint(step)
    completed = state.get("completed_steps") if isinstance(state, dict) else None
    if type(completed) is not int or completed != step:
        raise CorruptRunError(os.path.join(run.checkpoints_dir, f"step-{step:08d}"),
                              f"the checkpoint of step {step} says completed_steps {completed!r}")
    engine.load_state_dict(state)
    check_restored_state(run, engine, step)


# -------------------------------------------------------------------------- recording ---


def _row(record: StepRecord) -> StepRow:
    return StepRow(step=record.step, epoch=record.epoch, batch_ids=record.ids, batch_hash=batch_hash(record.ids),
                   loss=record.loss, lr=record.lr, metrics=record.metrics, fingerprints=record.fingerprints,
                   digest=record.digest, rank_digests=record.rank_digests)


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
        from .store.checkpoint import write_checkpoint

        self.collect(block=True)
        if self.run.ledger.checkpoint_files(step) is not None:
            self.run.ledger.remove_checkpoint(step)
        snapshot = device_module.host_copy(state)  # on the host: the device keeps training
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


def record_steps(run: RunDir, engine: Engine, total: int, progress: bool, observe=None) -> None:
    """Run the engine to `total` completed steps, writing ledger rows and checkpoints (including
    one at the current step if it is due and not yet recorded), then mark the run complete;
    `observe` (if given) is called with the engine after every step (experiments evaluate
    probes there). Steps the manifest lists under "trace_steps" are traced op by op into the
    run (replay.trace)."""
    from .trace import recording_traces

    with recording_traces(run, engine, run.manifest.get("trace_steps")):
        _record_steps(run, engine, total, progress, observe)


def _record_steps(run: RunDir, engine: Engine, total: int, progress: bool, observe=None) -> None:
    counts = set(run.manifest["checkpoints"]["counts"])
    bar = progress_bar(total - engine.completed, "record", progress)
    pending: list[StepRow] = []
    known_epochs = run.ledger.epochs()
    engine.start_workers()  # forked before the checkpoint thread starts, not while it writes
    writer = _CheckpointWriter(run)
    try:
        if engine.completed in counts and engine.completed not in run.ledger.checkpoints():
            writer.submit(engine.completed, engine.state_dict())
        while engine.completed < total:
            record = engine.run_step()
            if record.rank_differences:  # replicated state that disagrees: nothing after it is kept
                from .distributed import RankDivergence

                run.ledger.append_steps(pending)
                pending = []
                raise RankDivergence(f"{run.path}: after step {record.step} " + "; ".join(
                    f"rank {rank}'s state differs from rank 0's in {_shown_parts(parts)}"
                    for rank, parts in sorted(record.rank_differences.items()))
                    + " (replicated state that disagrees across ranks; the recording stops here)")
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
        engine.close()
        if bar is not None:
            bar.close()
