"""Sessions over a run directory (rr's vocabulary): RecordSession writes a run (and resumes
one that stopped), ReplaySession re-executes any stretch of it from the nearest checkpoint and
says where, and in which tensors, the replay diverges from the ledger. Both are thin layers over
the run driver (driver.py)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .driver import (  # noqa: F401  (re-exported: the session API predates driver.py)
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    Divergence,
    ReplayRefused,
    check_restored_state,
    compare_fingerprints,
    compare_record,
    dropped_from_start,
    engine_for_run,
    fresh_engine,
    load_run_program,
    progress_bar,
    program_as_recorded,
    record_steps,
    restore,
    root_manifest,
    state_differences,
)
from .device import kind_of, label, recorded_device
from .engine import Engine
from .program import load_program
from .store import CorruptRunError, RunDir, RunError


def _say_stderr(message: str) -> None:
    print(f"replay: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- record ----


class RecordSession:
    """Record a program into a new run directory, or continue one that stopped.

    >>> RecordSession("examples/digits_mlp.py:program", "runs/mlp", seed=1, steps=300).run()

    `drop_examples` leaves those example ids out of every batch from step 0 (batches shrink): the
    recording `replay forget` is defined to equal. `trace_steps` are traced op by op into the
    run's traces/ folder (replay.trace), references for diffing a later divergence. `device`
    replaces the program's own (Program.device).
    """

    def __init__(self, reference: str, out: str | os.PathLike, *, seed: int | None = None,
                 steps: int | None = None, checkpoint_every: int | None = None,
                 checkpoint_log_spaced: bool | None = None, progress: bool = True, drop_examples=(),
                 trace_steps=(), device: str | None = None):
        program, source = load_program(reference)
        self.drop_examples = sorted(set(drop_examples or ()))
        self.trace_steps = sorted(set(trace_steps or ()))
        self.program = program.with_overrides(seed=seed, steps=steps, checkpoint_every=checkpoint_every,
                                              checkpoint_log_spaced=checkpoint_log_spaced, device=device)
        self.source = source
        self.out = Path(out)
        self.progress = progress

    def run(self, observe=None) -> Path:
        """Record the run; `observe(engine)` is called after every step."""
        dropped = dropped_from_start(self.drop_examples)
        engine = Engine(self.program, Engine.contract_for(self.program), None, dropped)
        if engine.world is not None and self.program.batch_size < engine.world.size:
            from .distributed import DistributedError

            raise DistributedError(f"a batch of {self.program.batch_size} example(s) cannot be shared out across "
                                   f"{engine.world.size} processes: every rank needs at least one")
        for p in dropped:  # before the run directory exists: a refused id leaves nothing behind
            p.check(engine)
        if observe is not None:
            observe(engine)
        bad = [t for t in self.trace_steps if not 0 <= t < self.program.steps]
        if bad:
            raise ValueError(f"--trace-steps {bad}: outside the run's steps 0..{self.program.steps - 1}")
        manifest = root_manifest(self.program, self.source, engine, self.drop_examples, self.trace_steps)
        with RunDir.create(self.out, manifest) as run:
            record_steps(run, engine, self.program.steps, self.progress, observe)
        return self.out

    @staticmethod
    def resume(run_dir: str | os.PathLike, *, progress: bool = True, allow_source_change: bool = False,
               allow_environment_change: bool = False, allow_device_change: bool = False,
               device: str | None = None, say=_say_stderr) -> Path:
        """Continue a recording that stopped or crashed. The result is bit-identical to a
        recording that never stopped.

        It continues from the newest intact checkpoint: a newer one that is missing, damaged or
        disagrees with the ledger is skipped (and everything after the one used is forgotten),
        and a run with no usable checkpoint (killed before its first was recorded) starts again
        from its first step (a fork from its parent's state at the fork step). Each of these is
        said through `say` (stderr by default) and recorded as a ledger event. `device` continues
        it on another device than the recorded one (another kind needs `allow_device_change`)."""
        from .forget import CERTIFICATE, is_forget, write_certificate

        with RunDir.open(run_dir, writable=True) as run:
            complete = run.is_complete
        if complete:
            if is_forget(run_dir) and not (Path(run_dir) / CERTIFICATE).exists():
                write_certificate(run_dir)  # a forget stopped between its last step and its certificate
                say(f"{run_dir}: the forget was complete; wrote its certificate")
                return Path(run_dir)
            raise RunError(f"{run_dir}: the recording is already complete; nothing to resume")
        with RunDir.open(run_dir, writable=True) as run:
            manifest = run.manifest
            program, _ = load_run_program(run, allow_source_change, allow_environment_change, "resume",
                                          allow_device_change=allow_device_change, device=device)
            first = manifest.get("first_step", 0)
            engine, start, skipped = None, None, []
            for step in sorted(run.checkpoint_steps(), reverse=True):
                if step > program.steps:
                    continue
                candidate = engine_for_run(run, program)
                try:
                    restore(run, candidate, step)
                except (CorruptRunError, ValueError, KeyError, TypeError) as error:
                    skipped.append(step)
                    say(f"checkpoint {step} is not usable ({str(error).splitlines()[0]}); falling back to an earlier one")
                    continue
                engine, start = candidate, step
                break
            restarted = engine is None
            if restarted:
                if manifest.get("lineage"):
                    from .fork import restart_child

                    engine = restart_child(run, allow_source_change=allow_source_change,
                                           allow_environment_change=allow_environment_change,
                                           allow_device_change=allow_device_change, device=program.device)
                else:
                    engine = fresh_engine(run, program)
                start = first
                what = "its fork step" if manifest.get("lineage") else "step"
                say(f"{run.path}: no intact checkpoint is recorded; recording again from {what} {start}")
                run.truncate_after(start - 1)
            else:
                if skipped:
                    say(f"{run.path}: resuming from checkpoint {start}, the newest intact one")
                run.truncate_after(start - 1, keep_checkpoint=start)
            run.ledger.add_event("resume", {"from_checkpoint": None if restarted else start, "restarted": restarted,
                                            "skipped_checkpoints": skipped})
            record_steps(run, engine, program.steps, progress)
        if is_forget(run_dir):
            write_certificate(run_dir)
        return Path(run_dir)


# ---------------------------------------------------------------------------- replay ----


@dataclass
class VerifyReport:
    """What `verify` found: the steps replayed, the checkpoint restored from, the first
    divergence from the ledger, the stored checkpoints compared with the replayed state (and
    those that differ), and the damaged files (a run with damage is not replayed). `devices`
    is (recorded, replayed on) when an allowed device change put the replay on another kind."""

    start: int
    end: int
    restored_from: int | None
    divergence: Divergence | None
    checkpoints_compared: list[int] = field(default_factory=list)
    checkpoint_mismatches: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)
    devices: tuple[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.divergence is None and not self.checkpoint_mismatches and not self.damaged

    def describe(self) -> str:
        note = []
        if self.devices is not None:
            note = [f"note: recorded on {self.devices[0]}, replayed on {self.devices[1]} (an allowed device change): "
                    "the comparison is bit for bit as always; torch's matrix products and convolutions are not "
                    "promised to agree across kinds of device, replay's own ops are"]
        if self.ok:
            origin = "a fresh start" if self.restored_from is None else f"checkpoint {self.restored_from}"
            return "\n".join([f"OK: steps {self.start}..{self.end - 1} replay bit for bit (from {origin}); "
                              f"{len(self.checkpoints_compared)} stored checkpoints equal the replayed state"] + note)
        lines = []
        if self.damaged:
            lines.append(f"DAMAGED: {len(self.damaged)} problem(s) with the run's files:")
            lines += [f"  {d}" for d in self.damaged]
        if self.divergence is not None:
            lines.append(self.divergence.describe())
        for step, parts in sorted(self.checkpoint_mismatches.items()):
            shown = "; ".join(f"{k}: {', '.join(v[:6])}" + (" ..." if len(v) > 6 else "") for k, v in parts.items())
            lines.append(f"stored checkpoint {step} differs from the replayed state ({shown})")
        return "\n".join(lines + note)


def verify_files(run_dir: str | os.PathLike) -> list[str]:
    """Integrity alone, without executing or replaying anything: every problem with the files
    the run records (empty when intact)."""
    from .store.integrity import check_files

    with RunDir.open(run_dir) as run:
        return check_files(run)


class ReplaySession:
    """Re-execute a recorded run from its checkpoints and compare every step with the ledger."""

    def __init__(self, run_dir: str | os.PathLike, *, allow_source_change: bool = False,
                 allow_environment_change: bool = False, allow_device_change: bool = False,
                 device: str | None = None):
        self.path = Path(run_dir)
        self.allow_source_change = allow_source_change
        self.allow_environment_change = allow_environment_change
        self.allow_device_change = allow_device_change
        self.device = device  # None: the device the run was recorded on

    def verify(self, start: int | None = None, end: int | None = None, *, progress: bool = True) -> VerifyReport:
        """Check every file the run records (hash, then parse), then replay steps [start, end)
        (default: every recorded step), compare each step with the ledger and each stored
        checkpoint passed on the way with the replayed state. A run with damaged files is
        reported without replaying (and without executing its program)."""
        from .store.integrity import check_files

        writable = self.allow_source_change or self.allow_environment_change or self.allow_device_change
        with RunDir.open(self.path, writable=writable) as run:
            last = run.ledger.last_step()
            first = run.manifest.get("first_step", 0)
            if last is None:
                raise RunError(f"{self.path}: the ledger has no steps to verify")
            start = first if start is None else start
            end = last + 1 if end is None else end
            if not first <= start < end <= last + 1:
                raise RunError(f"cannot verify steps [{start}, {end}): the ledger holds steps {first}..{last}")
            damaged = check_files(run)
            if damaged:
                return VerifyReport(start=start, end=end, restored_from=None, divergence=None, damaged=damaged)
            program, _ = load_run_program(run, self.allow_source_change, self.allow_environment_change, "verify",
                                          allow_device_change=self.allow_device_change, device=self.device)
            checkpoints = run.checkpoint_steps()
            engine = engine_for_run(run, program)
            compared, mismatches = [], {}
            if start == 0 and not run.manifest.get("lineage"):
                restored_from = None  # from the program itself: checkpoint 0 is compared too
            else:
                restored_from = run.latest_checkpoint_at_or_before(start)
                if restored_from is None:
                    raise RunError(f"{self.path}: no checkpoint at or before step {start}")
                restore(run, engine, restored_from)

            def compare_checkpoint() -> None:
                c = engine.completed
                if c in checkpoints and c != restored_from:
                    compared.append(c)
                    differing = state_differences(run.load_checkpoint(c), engine.state_dict())
                    if differing:
                        mismatches[c] = differing

            compare_checkpoint()
            rows = {r.step: r for r in run.ledger.rows(engine.completed, end)}
            bar = progress_bar(end - engine.completed, "verify", progress)
            divergence = None
            try:
                while engine.completed < end:
                    record = engine.run_step()
                    if record.step >= start:
                        divergence = compare_record(rows[record.step], record)
                        if divergence is not None:
                            break
                    compare_checkpoint()
                    if bar is not None:
                        bar.update(1)
            finally:
                engine.close()
                if bar is not None:
                    bar.close()
            recorded = recorded_device(run.manifest)
            devices = None
            if kind_of(program.device) != recorded["kind"]:
                devices = (label(recorded), program.device)
            return VerifyReport(start=start, end=end, restored_from=restored_from, divergence=divergence,
                                checkpoints_compared=compared, checkpoint_mismatches=mismatches, devices=devices)
