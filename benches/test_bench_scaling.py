"""Scaling: forks per minute of one experiment against workers, for local processes and Ray.

A small experiment on the demo's digits AdamW program (replay.demo:adamw_program): 4 seeds, one
fork step 20, 60 steps, three arms (placebo, a first-moment reset, the one-bit-flip reference):
4 tasks (one per seed: its recording and its 3 children), 12 children. Four candidates, each
running it from scratch into a fresh folder, interleaved within a round:

    local 1   Experiment.run(workers=1): this process
    local 2   Experiment.run(workers=2): 2 spawned processes (their start-up is in the time)
    ray 1     Experiment.run(ray=True) on a local Ray instance with 1 CPU
    ray 2     the same with 2 CPUs

The figure is children per minute of `Experiment.run`'s wall time (tasks and estimates). A Ray
instance is started for each Ray candidate (ray.init, timed apart and shown: a command pays it
once) and shut down after it; its worker processes start inside the timed run, as local
processes do. All four results.json agree (checked).

Every task runs torch with the driver's thread count (the runner passes it: it can change the
bits), so the bench runs twice: with torch's default (one thread per core: 2 workers on 2 cores
then run 4 threads, which spin-wait for each other) and with 1 thread (the driver sets it, as
`OMP_NUM_THREADS=1 replay experiment ...` would). The two give different bits, each the same for
every executor. Smoke mode runs on one thread already (benches/conftest.py): only the 1-thread
case runs there. No goal: the gain depends on the free cores.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

from replay.experiment import Arm, Experiment, ExperimentSpec

from ._timing import Interleaved, check_info

ROUNDS, WARMUP = 3, 1
CANDIDATES = [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]


def spec(smoke: bool) -> ExperimentSpec:
    steps, fork, horizons, seeds = (12, 4, [0, 2], [1, 2]) if smoke else (60, 20, [0, 10, 30], [1, 2, 3, 4])
    return ExperimentSpec(
        name="bench: scaling", program="replay.demo:adamw_program", seeds=seeds, fork_steps=[fork], steps=steps,
        arms=[Arm("placebo", ["placebo"]), Arm("m_reset", ["reset_exp_avg"]), Arm("bitflip", ["bitflip"], reference=True)],
        horizons=horizons, probe={"source": "replay.demo:probe"}, distances=["tv"], bootstrap_resamples=100,
    )


def results_without_duration(results: dict) -> str:
    results = json.loads(json.dumps(results, allow_nan=True))
    results["experiment"].pop("duration_s")
    return json.dumps(results, sort_keys=True)


@pytest.mark.benchmark(group="scaling")
@pytest.mark.parametrize("threads", [1, "default"])
def test_scaling(benchmark, smoke, tmp_path, threads):
    if smoke and threads == "default":
        pytest.skip("smoke mode runs torch on one thread (benches/conftest.py): the 1-thread case covers it")
    try:
        import ray
    except ImportError:
        if os.environ.get("REPLAY_REQUIRE_RAY") == "1":
            pytest.fail('REPLAY_REQUIRE_RAY=1 and Ray is not installed (pip install "replay[ray]")')
        pytest.skip('Ray is not installed (pip install "replay[ray]")')
    experiment_spec = spec(smoke)
    folders = iter(range(1_000_000))
    answers: dict[str, set[str]] = {}

    def candidate(executor: str, n: int):
        def run() -> dict:
            out = tmp_path / f"{executor}{n}-{next(folders)}"
            start_s = 0.0
            if executor == "ray":
                start = time.perf_counter()
                ray.init(num_cpus=n, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
                start_s = time.perf_counter() - start
            try:
                start = time.perf_counter()
                results = Experiment(experiment_spec, out).run(workers=n, progress=False, ray=executor == "ray")
                total = time.perf_counter() - start
            finally:
                if executor == "ray":
                    ray.shutdown()
            answers.setdefault(f"{executor} {n}", set()).add(results_without_duration(results))
            return {"total_s": total, "start_s": start_s}
        return run

    import torch

    timing = Interleaved({f"{executor} {n}": candidate(executor, n) for executor, n in CANDIDATES})
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads == 1 else default_threads)
    try:
        timing.run(benchmark, rounds=1 if smoke else ROUNDS, warmup=0 if smoke else WARMUP)
        task_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(default_threads)
    children = len(experiment_spec.seeds) * len(experiment_spec.arms) * len(experiment_spec.fork_steps)
    figures = {}
    for name in timing.candidates:
        runs = sorted(timing.kept(name, results=True), key=lambda r: r["total_s"])
        median = runs[len(runs) // 2]
        figures[name] = {"experiment_s": median["total_s"], "forks_per_minute": 60 * children / median["total_s"],
                         "instance_start_s": median["start_s"]}
    base = figures["local 1"]["forks_per_minute"]
    for figure in figures.values():
        figure["speedup"] = figure["forks_per_minute"] / base
    # Every executor and worker count gives the same results, in every round.
    assert len(set().union(*answers.values())) == 1, {name: [hash(a) for a in v] for name, v in answers.items()}
    benchmark.extra_info.update({
        "smoke": smoke, "rounds": timing.measured_rounds, "program": experiment_spec.program,
        "seeds": len(experiment_spec.seeds), "arms": len(experiment_spec.arms), "steps": experiment_spec.steps,
        "fork_steps": experiment_spec.fork_steps, "children": children, "ray": ray.__version__,
        "task_threads": task_threads,
        "median_ms": {name: 1e3 * f["experiment_s"] for name, f in figures.items()},
        "candidates": figures, "goals": [],
    })
    check_info(benchmark.extra_info, ["children", "candidates", "seeds", "task_threads"])
