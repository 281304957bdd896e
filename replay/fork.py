"""Forks: replay a run to step T, change one piece of training memory, run on.

ForkSession restores the parent's nearest checkpoint at or before T once, replays to T while
checking every step against the parent's ledger, and keeps the state at T in memory. Each
fork() then starts from a copy of that state, so several children of one step cost one restore.
A child is a full run directory with lineage: the parent's id, path and a digest of what the
child depends on (the parent's manifest and ledger up to T), the fork step, the perturbations as
JSON and their window. It keeps the parent's RNG contract and policies, so only the
perturbation differs; a placebo child reproduces the parent's ledger bit for bit.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from .driver import (
    Divergence,
    child_manifest,
    compare_record,
    engine_for_run,
    load_run_program,
    program_as_recorded,
    progress_bar,
    record_steps,
    restore,
)
from .engine import Engine
from .lineage import lineage_digest, parent_of  # noqa: F401  (lineage_digest re-exported: it lived here)
from .perturb import Perturbation, PerturbationRefused, from_spec
from .program import load_program
from .store import RunDir, RunError


class ForkError(RunError):
    """A fork that cannot be made faithfully (the parent does not replay, bad step range)."""


@dataclass
class PlaceboReport:
    fork_step: int
    end: int
    divergence: Divergence | None

    @property
    def ok(self) -> bool:
        return self.divergence is None


class ForkSession:
    """The state of a recorded run at step `at`, ready to be forked any number of times."""

    def __init__(self, parent: str | os.PathLike, at: int, *, allow_source_change: bool = False,
                 allow_environment_change: bool = False, allow_device_change: bool = False,
                 device: str | None = None, progress: bool = True):
        self.parent = Path(parent)
        self.at = at
        self.progress = progress
        writable = allow_source_change or allow_environment_change or allow_device_change
        with RunDir.open(self.parent, writable=writable) as run:
            self.manifest = run.manifest
            first = self.manifest.get("first_step", 0)
            last = run.ledger.last_step()
            if last is None or not first <= at <= last + 1:
                raise ForkError(f"cannot fork {self.parent} at step {at}: it recorded steps {first}..{last}")
            self.program, self._sha256 = load_run_program(run, allow_source_change, allow_environment_change, "fork",
                                                          allow_device_change=allow_device_change, device=device)
            restored = run.latest_checkpoint_at_or_before(at)
            if restored is None:
                raise ForkError(f"{self.parent}: no checkpoint at or before step {at}")
            engine = engine_for_run(run, self.program)
            restore(run, engine, restored)
            rows = {r.step: r for r in run.ledger.rows(restored, at - 1)} if at > restored else {}
            while engine.completed < at:
                record = engine.run_step()
                divergence = compare_record(rows[record.step], record)
                if divergence is not None:
                    raise ForkError(f"{self.parent} does not replay up to the fork step:\n{divergence.describe()}")
            engine.close()  # its data-loader workers, if any: the children have their own
            self.parent_last = last
            self.parent_digest = lineage_digest(run, at)
        self.state = engine.state_dict()
        self._parent_engine = engine

    def _child_engine(self, perturbations: Sequence[Perturbation]) -> Engine:
        # A freshly loaded program for every child, as a child restored in a new process would
        # have: Python-level state the program keeps outside its checkpoints (a module-level
        # counter, say) then shows as a divergence instead of leaking from parent to child.
        # (A program referenced as an installed module is imported once per process.)
        # The file is executed again only if it still hashes as it did when the session opened.
        parent = self.manifest
        program = program_as_recorded(load_program(parent["program"]["reference"], self._sha256)[0], parent,
                                      device=self.program.device)
        engine = engine_for_run(parent, program, perturbations)
        engine.load_state_dict(copy.deepcopy(self.state))
        return engine

    def perturbations(self, specs, window: int = 1) -> list[Perturbation]:
        specs = [specs] if isinstance(specs, (str, dict, Perturbation)) else list(specs)
        result = []
        for spec in specs:
            p = spec if isinstance(spec, Perturbation) else from_spec(spec, start=self.at, window=window)
            if p.start < self.at:
                raise ForkError(f"perturbation {p.name} starts at step {p.start}, before the fork step {self.at}")
            result.append(p)
        if not result:
            raise ForkError("a fork needs at least one perturbation (use 'placebo' to change nothing)")
        return result

    def fork(self, out: str | os.PathLike, perturb, *, window: int = 1, steps: int | None = None,
             until: int | None = None, observe=None, events: Sequence[tuple[str, dict]] = ()) -> Path:
        """Write a child run to `out`: the perturbations act at the fork step (or over
        [T, T + window)), then the child runs under the parent's policies to `until` (default:
        the parent's last step) or for `steps` steps. `observe(engine)` is called after every
        step of the child. `events` (kind, detail) are written to the child's ledger before its
        first step."""
        perturbations = self.perturbations(perturb, window)
        if steps is not None and until is not None:
            raise ValueError("give steps or until, not both")
        end = self.at + steps if steps is not None else (until if until is not None else self.manifest["steps"])
        if end <= self.at:
            raise ForkError(f"a child must run at least one step after the fork step {self.at} (until={end})")
        engine = self._child_engine(perturbations)
        for p in perturbations:
            p.check(engine)
        manifest = child_manifest(self.manifest, self.parent, Path(out), self.parent_digest, self.at, end,
                                  engine, perturbations)
        try:
            self._write_child(out, manifest, engine, perturbations, end, observe, events)
        except PerturbationRefused:
            # Refused when it acted at T: leave no half-made child behind.
            shutil.rmtree(out, ignore_errors=True)
            raise
        return Path(out)

    def _write_child(self, out, manifest, engine, perturbations, end, observe, events=()) -> None:
        with RunDir.create(out, manifest) as run:
            run.ledger.add_event("intervention_window", {"start": self.at, "end": max(p.end for p in perturbations),
                                                         "perturbations": [p.to_json() for p in perturbations]})
            for kind, detail in events:
                run.ledger.add_event(kind, detail)
            record_steps(run, engine, end, self.progress, observe)

    def placebo_check(self, steps: int | None = None) -> PlaceboReport:
        """Run a placebo child in memory for `steps` steps (default: to the parent's end) and
        compare every step with the parent's ledger: a divergence names state the program
        failed to capture in its checkpoints."""
        end = self.parent_last + 1 if steps is None else min(self.parent_last + 1, self.at + steps)
        with RunDir.open(self.parent) as run:  # read here, not when the session opens: forks never need them
            rows_after = {r.step: r for r in run.ledger.rows(self.at, end - 1)}
        engine = self._child_engine(self.perturbations("placebo"))
        bar = progress_bar(end - self.at, f"placebo@{self.at}", self.progress)
        try:
            while engine.completed < end:
                record = engine.run_step()
                divergence = compare_record(rows_after[record.step], record)
                if divergence is not None:
                    return PlaceboReport(self.at, end, divergence)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return PlaceboReport(self.at, end, None)


def restart_child(child: RunDir, *, allow_source_change: bool = False, allow_environment_change: bool = False,
                  allow_device_change: bool = False, device: str | None = None) -> Engine:
    """The engine a fork starts from (its parent's state at the fork step, its perturbations
    applied), rebuilt from the parent (on `device`, default the parent's): for a child killed
    before its first checkpoint was recorded. RunError if the parent is gone or changed since
    the fork."""
    manifest = child.manifest
    lineage = manifest["lineage"]
    parent = parent_of(child.path, manifest)
    if not (parent / "manifest.json").is_file():
        raise RunError(f"{child.path}: no checkpoint is recorded and the parent {parent} is gone; "
                       "the fork cannot be restarted")
    session = ForkSession(parent, lineage["fork_step"], progress=False, allow_source_change=allow_source_change,
                          allow_environment_change=allow_environment_change,
                          allow_device_change=allow_device_change, device=device)
    if session.manifest.get("run_id") != lineage["parent_id"] or session.parent_digest != lineage["parent_digest"]:
        raise RunError(f"{child.path}: no checkpoint is recorded and the parent {parent} changed since the fork; "
                       "the fork cannot be restarted faithfully")
    inherited = len(session.manifest.get("lineage", {}).get("perturbations", []))
    perturbations = [from_spec(spec) for spec in lineage["perturbations"][inherited:]]
    engine = session._child_engine(perturbations)
    for p in perturbations:
        p.check(engine)
    if "rng_effective" in manifest and engine.contract.to_json() != manifest["rng_effective"]:
        raise RunError(f"{child.path}: the restarted fork's random streams differ from the recorded ones")
    return engine


def fork(parent, out, *, at: int, perturb, window: int = 1, steps: int | None = None, until: int | None = None,
         progress: bool = True, **allow) -> Path:
    """Fork `parent` at step `at` with `perturb` (a spec, a list of specs, or Perturbations)."""
    return ForkSession(parent, at, progress=progress, **allow).fork(out, perturb, window=window, steps=steps, until=until)


def _fork_group(parent: str, at: int, children: list[dict], progress: bool) -> list[str]:
    session = ForkSession(parent, at, progress=progress)
    return [str(session.fork(c["out"], c["perturb"], window=c.get("window", 1), steps=c.get("steps"),
                             until=c.get("until"))) for c in children]


def fork_many(parent, at: int, children: Sequence[dict], *, workers: int = 1, progress: bool = False) -> list[Path]:
    """Several children of one step: {"out", "perturb", "window"?, "steps"?, "until"?} each.
    One restore per worker process (workers > 1 run in parallel, spawned fresh)."""
    children = list(children)
    if workers <= 1 or len(children) <= 1:
        return [Path(p) for p in _fork_group(str(parent), at, children, progress)]
    groups = [children[i::workers] for i in range(min(workers, len(children)))]
    with ProcessPoolExecutor(max_workers=len(groups), mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_fork_group, [str(parent)] * len(groups), [at] * len(groups), groups, [False] * len(groups)))
    order = {id(c): i for i, c in enumerate(children)}
    paths: list[Path | None] = [None] * len(children)
    for group, result in zip(groups, done):
        for child, path in zip(group, result):
            paths[order[id(child)]] = Path(path)
    return paths


def _check_one(parent: str, at: int, steps: int | None) -> dict:
    try:
        report = ForkSession(parent, at, progress=False).placebo_check(steps)
    except ForkError as error:  # the replay from the checkpoint before `at` already diverges
        return {"at": at, "end": at, "divergence": str(error)}
    return {"at": at, "end": report.end, "divergence": None if report.ok else report.divergence.describe()}


def check(parent, at: Sequence[int], *, steps: int | None = None, workers: int = 1) -> list[dict]:
    """Placebo forks at each step of `at`: {"at", "end", "divergence" (None or a description)}."""
    at = list(at)
    if workers <= 1 or len(at) <= 1:
        return [_check_one(str(parent), t, steps) for t in at]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_check_one, [str(parent)] * len(at), at, [steps] * len(at)))
