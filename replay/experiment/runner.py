"""The experiment runner: record the factual runs, fork every arm, evaluate the probe.

Layout of an experiment directory:
    spec.json                      the normalized spec
    runs/<program>/seed-<s>/       factual runs (full run directories)
    runs/<program>/seed-<s>.forks/T<T>/<arm>/   child runs
    evals/<key>.safetensors + <key>.json        probe evaluations of each run (hash-checked)
    results.json                   estimates, lifetimes, placebo check, reporting checklist
Resuming reuses every run that is complete with a valid evaluation file; a crash loses at most
the runs in flight. The numbers are computed by replay.experiment.estimation.

One task is the factual run of one (program, seed) and all its forks (`run_seed`): a pure
function of the spec, the program, the seed and the arms, that writes its own run directories
and evaluation files. `run` executes the tasks in this process, in local processes (`workers`),
or as Ray tasks (`ray`, replay.experiment.ray_backend); the estimates are computed from the
evaluation files afterwards, so every executor gives the same bits.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from ..fork import ForkSession
from ..program import load_program
from ..session import RecordSession
from ..store import RunDir, RunError
from ..store.atomic import atomic_write_json
from .probe import Recorder, load_evaluations, load_probe, with_suffix
from .spec import ExperimentError, ExperimentSpec


class Experiment:
    def __init__(self, spec: ExperimentSpec, out: str | os.PathLike):
        self.spec = spec
        self.out = Path(out)

    # Where things go.
    def run_dir(self, key: str, seed: int) -> Path:
        return self.out / "runs" / key / f"seed-{seed}"

    def child_dir(self, key: str, seed: int, fork_step: int, arm: str) -> Path:
        return self.out / "runs" / key / f"seed-{seed}.forks" / f"T{fork_step}" / arm

    def eval_path(self, run_dir: Path) -> Path:
        return self.out / "evals" / str(run_dir.relative_to(self.out / "runs")).replace(os.sep, "__")

    def eval_steps(self, key: str) -> dict[int, set[int]]:
        """fork step -> the absolute steps every run of program `key` is evaluated at."""
        steps = self.total_steps(key)
        out = {}
        for T in self.spec.fork_steps:
            wanted = {T + a.window + h for a in self.spec.arms_of(key) for h in self.spec.horizons}
            out[T] = {s for s in wanted if s <= steps}
        return out

    def total_steps(self, key: str) -> int:
        if self.spec.steps is not None:
            return self.spec.steps
        program, _ = load_program(self.spec.programs()[key])
        return program.steps

    def tasks(self) -> list[tuple[str, int]]:
        return [(key, seed) for key in self.spec.programs() for seed in self.spec.seeds]

    def _prepare(self) -> None:
        (self.out / "evals").mkdir(parents=True, exist_ok=True)
        spec_path = self.out / "spec.json"
        spec_json = self.spec.to_json()
        if spec_path.exists():
            previous = json.loads(spec_path.read_text())
            if previous != json.loads(json.dumps(spec_json)):
                raise ExperimentError(
                    f"{self.out} holds an experiment with a different spec; use another --out or delete it"
                )
        else:
            atomic_write_json(spec_path, spec_json)
        for key in self.spec.programs():
            steps = self.total_steps(key)
            bad = [T for T in self.spec.fork_steps if not 0 < T < steps]
            if bad:
                raise ValueError(f"fork steps {bad} are outside program {key}'s run of {steps} steps")
            if self.spec.kind == "witness":
                need = max(self.spec.fork_steps) + max(self.spec.witness["instrument_steps"]) + max(self.spec.horizons)
                if need > steps:
                    raise ValueError(f"the witness needs {need} steps of program {key} (last fork step + longest "
                                     f"instrument + longest common instrument), its run has {steps}: raise `steps` "
                                     "or shorten them")

    def _reusable(self, run_dir: Path) -> bool:
        if not (run_dir / "manifest.json").exists():
            return False
        try:
            with RunDir.open(run_dir) as run:
                if not run.is_complete:
                    return False
                last = max(run.ledger.checkpoints())
                run.load_checkpoint(last)  # the final state passes its hash check
        except (RunError, ValueError):
            return False
        return load_evaluations(self.eval_path(run_dir)) is not None

    def run_seed(self, key: str, seed: int, progress: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, str]:
        """The factual run of (program, seed) and all its forks, each skipped if reusable. A run
        that is not reusable (missing, or half-written by a task that was killed) is deleted and
        made again from the start, so a retried task writes the bits of an uninterrupted one.

        Returns {evaluation file, relative to the experiment folder: its sha256} for every run
        of the task, made or reused: what a driver on another machine checks it can read."""
        x, _, _ = load_probe(self.spec.probe)
        layer = self.spec.probe.get("layer")
        eval_steps = self.eval_steps(key)
        every_eval = set().union(*eval_steps.values()) | set(self.spec.fork_steps)
        parent = self.run_dir(key, seed)
        evaluations = {}
        if not self._reusable(parent):
            _remove_run(parent)
            recorder = Recorder(x, layer, every_eval)
            parent.parent.mkdir(parents=True, exist_ok=True)
            RecordSession(self.spec.programs()[key], parent, seed=seed, steps=self.spec.steps,
                          progress=progress).run(observe=recorder)
            recorder.save(self.eval_path(parent))
            log(f"recorded {parent.relative_to(self.out)}")
        evaluations.update(self._evaluation_hash(parent))
        for T in self.spec.fork_steps:
            session = None
            for arm in self.spec.arms_of(key):
                child = self.child_dir(key, seed, T, arm.name)
                if self._reusable(child):
                    evaluations.update(self._evaluation_hash(child))
                    continue
                _remove_run(child)
                if session is None:
                    session = ForkSession(parent, T, progress=progress)
                recorder = Recorder(x, layer, eval_steps[T])
                child.parent.mkdir(parents=True, exist_ok=True)
                session.fork(child, arm.perturb, window=arm.window, observe=recorder)
                recorder.save(self.eval_path(child))
                log(f"forked {child.relative_to(self.out)}")
                evaluations.update(self._evaluation_hash(child))
        return evaluations

    def _evaluation_hash(self, run_dir: Path) -> dict[str, str]:
        """{the evaluation file of run_dir, relative to the experiment folder: the sha256 its
        metadata records (which load_evaluations checks the data against)}."""
        meta = with_suffix(self.eval_path(run_dir), ".json")
        return {str(meta.relative_to(self.out)): json.loads(meta.read_text())["sha256"]}

    def run(self, workers: int | None = None, progress: bool = True, ray: bool | str = False) -> dict:
        """Run everything that is missing, then estimate; returns the results.

        workers: local processes (default 1: this process). ray: run the tasks as Ray tasks
        instead: True starts a local Ray instance with `workers` CPUs (default: all) unless this
        process already joined one (ray.init), a string is the address of a running cluster
        (`workers` must then be None: the cluster has its CPUs). See ray_backend."""
        if ray is not False:
            from .ray_backend import import_ray, run_tasks

            import_ray()  # before anything is written: a clear error if Ray is not installed
            if isinstance(ray, str) and workers is not None:
                raise ValueError("--workers with a --ray address: the cluster's CPUs decide how many tasks run at once")
        self._prepare()
        tasks = self.tasks()
        started = time.time()
        if ray is not False:
            run_tasks(self, tasks, address=None if ray is True else ray, cpus=workers, progress=progress)
        elif workers is None or workers <= 1:
            for i, (key, seed) in enumerate(tasks, 1):
                self.run_seed(key, seed, progress=progress,
                              log=lambda m, i=i: print(f"[{i}/{len(tasks)}] {m}", file=sys.stderr, flush=True))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                import torch

                threads = torch.get_num_threads()
                futures = {pool.submit(_run_seed_task, self.spec.to_json(), str(self.out), key, seed, threads): (key, seed)
                           for key, seed in tasks}
                for i, future in enumerate(as_completed(futures), 1):
                    future.result()
                    key, seed = futures[future]
                    print(f"[{i}/{len(tasks)}] program {key}, seed {seed}: done", file=sys.stderr, flush=True)
        from .estimation import write_results

        results = self.estimate()
        results["experiment"]["duration_s"] = time.time() - started
        write_results(self.out, results)
        return results

    def program_sha256(self) -> str:
        _, source = load_program(self.spec.program)
        return source.sha256

    def estimate(self) -> dict:
        """The estimates from the stored evaluations (nothing is run)."""
        from .estimation import estimate

        return estimate(self)


def _remove_run(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def _run_seed_task(spec_json: dict, out: str, key: str, seed: int, threads: int,
                   log: Callable[[str], None] | None = None) -> dict:
    """One task, as a process pool or Ray runs it: plain JSON-able arguments and result (the
    evaluation files' hashes, see Experiment.run_seed).

    `threads` is the driver's torch thread count: the number of threads can change the bits of
    torch's CPU matrix products, and a fresh process (or a Ray worker, given OMP_NUM_THREADS=1)
    starts with its own default, so without it a driver that set another count (the benches'
    smoke mode runs on one thread) got other results from --workers 2 than from --workers 1."""
    import torch

    torch.set_num_threads(threads)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    return Experiment(ExperimentSpec(**spec_json), out).run_seed(key, seed, progress=False, log=log)
