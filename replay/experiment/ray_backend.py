"""An experiment's tasks as Ray tasks: `replay experiment SPEC --out DIR --ray [ADDRESS]`.

Ray only replaces the executor. Each task is runner._run_seed_task (the factual run of one
(program, seed) and its forks, the same function local processes run): a pure function of the
spec, the seed and the arms that writes its run directories and evaluation files under the
experiment folder itself and returns plain JSON-able data (the evaluation files' hashes, its log
lines, the environment it ran in). The driver then estimates from the files, as after
`--workers 1`, so the results are the same bits.

What a cluster must provide (checked where it can be):
- the experiment folder (`--out`) on a filesystem every node shares, at the same path, with
  flock and atomic rename (NFS v4, CephFS, Lustre): the driver reads back each evaluation file a
  task reports and fails, naming the file, if it is missing or differs;
- the same replay, torch and CPU kind on every node: each task reports its environment and the
  driver refuses one that differs from its own in a key that can change bits;
- the program and probe files at the paths the spec names (a TOML spec makes them absolute).

A killed task (its worker process or node died) is retried by Ray (MAX_RETRIES). The retry
deletes what the killed attempt left half-written and makes it again (Experiment.run_seed), so
it writes the bits of an uninterrupted task. An exception raised by the program is not retried:
it would be raised again.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..store import RunError
from .spec import ExperimentError

INSTALL = 'pip install "replay[ray]"'
# System failures only (a worker or node that died); Ray's own default is 3.
MAX_RETRIES = 3


def import_ray():
    """The ray module, or an ImportError that says how to install it (no fallback to local
    processes: the user asked for Ray)."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(f"--ray needs Ray, which is not installed: {INSTALL}") from error
    return ray


def _task(spec_json: dict, out: str, key: str, seed: int, cwd: str, threads: int) -> dict:
    """runner._run_seed_task inside a Ray worker (with the driver's torch thread count, not the
    one Ray gives its workers through OMP_NUM_THREADS: see _run_seed_task)."""
    from ..environment import environment
    from .runner import _run_seed_task

    # Relative program references are relative to the driver's working directory (a local
    # instance's workers start there already; a cluster's, where the shared filesystem has it).
    if os.path.isdir(cwd):
        os.chdir(cwd)
    lines: list[str] = []
    evaluations = _run_seed_task(spec_json, out, key, seed, threads, log=lines.append)
    return {"evaluations": evaluations, "log": lines, "environment": environment(),
            "node": os.uname().nodename}


def check_environment(driver: dict, task: dict, node: str) -> None:
    """Refuse a task that ran where the bits can differ from the driver's (another torch,
    replay, CPU kind, thread count...): its runs would not be those of `--workers 1`."""
    from ..environment import differences

    differ = differences(driver, task)
    if differ:
        shown = ", ".join(f"{k}: {a!r} here, {b!r} there" for k, (a, b) in differ.items())
        raise ExperimentError(f"a Ray task ran on node {node} in another environment than the driver's ({shown}); "
                              "every node needs the same replay, torch and CPU kind")


def check_evaluations(out: Path, evaluations: dict[str, str], node: str) -> None:
    """The driver reads what the task wrote: each evaluation file exists here with the hash
    the task saw (else --out is not on a filesystem the nodes share)."""
    import json

    for relative, sha256 in sorted(evaluations.items()):
        path = out / relative
        try:
            seen = json.loads(path.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            seen = None
        if seen != sha256:
            raise ExperimentError(f"{path}: the Ray task on node {node} wrote this evaluation file, but the driver "
                                  f"{'cannot read it' if seen is None else 'reads another version'}: --out must be "
                                  "on a filesystem every node shares, at the same path")


def run_tasks(experiment, tasks: list[tuple[str, int]], *, address: str | None, cpus: int | None,
              progress: bool) -> None:
    """Run every (program, seed) task of `experiment` as a Ray task; returns when all are done
    and checked. A process that already joined Ray (ray.init) uses that instance as it is;
    otherwise this joins `address` (a running cluster, e.g. "auto" or "HEAD:6379") or, when it is
    None, starts a local instance with `cpus` CPUs (default: all), and leaves it at the end."""
    ray = import_ray()
    import torch
    from tqdm import tqdm

    from ..environment import environment

    if address is not None and cpus is not None:  # Experiment.run says so before writing anything
        raise ValueError("--workers with a --ray address: the cluster's CPUs decide how many tasks run at once")
    joined = not ray.is_initialized()
    if joined:
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        if address is None:
            ray.init(num_cpus=cpus, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    pending: dict = {}
    try:
        out = experiment.out.resolve()
        # Each task needs one CPU; a killed worker is a system failure Ray retries, an exception
        # raised by the program is not (it would be raised again).
        remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_task)
        spec_json = experiment.spec.to_json()
        cwd, threads = os.getcwd(), torch.get_num_threads()
        pending = {remote.remote(spec_json, str(out), key, seed, cwd, threads): (key, seed) for key, seed in tasks}
        here = environment()
        with tqdm(total=len(tasks), unit="task", desc="ray tasks", disable=not progress, file=sys.stderr) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                key, seed = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.ObjectLostError) as error:  # every retry died too
                    raise RunError(f"the Ray task for program {key!r}, seed {seed} died {MAX_RETRIES + 1} times "
                                   f"({type(error).__name__}); what it finished is kept: run the same command "
                                   "again to resume the experiment") from None
                for line in result["log"]:
                    bar.write(f"[{result['node']}] {line}", file=sys.stderr)
                check_environment(here, result["environment"], result["node"])
                check_evaluations(out, result["evaluations"], result["node"])
                bar.update(1)
    finally:
        for ref in pending:  # an error left tasks running: stop them (a shared instance lives on)
            ray.cancel(ref, force=True)
        if joined:
            ray.shutdown()
