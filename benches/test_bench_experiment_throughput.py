"""Experiment throughput: how many forks an experiment gets through per minute.

A tiny experiment on the demo's digits AdamW program (replay.demo:adamw_program, ~2 ms a step):
3 seeds, one fork step 20, 60 steps, three arms (placebo, a first-moment reset, the one-bit-flip reference),
in one process (workers=1). Each round runs it from scratch into a fresh folder: the factual
recordings, the ForkSessions, the children (each written as a full run and evaluated on the
probe set at the steps its horizons need), then the estimates. The figure is children per
minute of the whole experiment's wall time; the wall time is also split by phase (wrapped
RecordSession.run, ForkSession construction, ForkSession.fork, Experiment.estimate; the
remainder is spec checks, probe loading and reuse checks). No goal: the figure is tracked.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from replay.experiment import Arm, Experiment, ExperimentSpec
from replay.fork import ForkSession
from replay.session import RecordSession

from ._timing import Interleaved, check_info

ROUNDS, WARMUP = 3, 1


def tiny_spec(smoke: bool) -> ExperimentSpec:
    steps, fork, horizons = (12, 4, [0, 2]) if smoke else (60, 20, [0, 10, 30])
    arms = [Arm("placebo", ["placebo"]), Arm("m_reset", ["reset_exp_avg"]), Arm("bitflip", ["bitflip"], reference=True)]
    return ExperimentSpec(
        name="bench: tiny experiment", program="replay.demo:adamw_program", seeds=[1, 2] if smoke else [1, 2, 3],
        fork_steps=[fork], steps=steps, arms=arms[::2] if smoke else arms,
        horizons=horizons, probe={"source": "replay.demo:probe"}, distances=["tv"], bootstrap_resamples=100,
    )


class Phases:
    """Wall time spent in each phase of an experiment, by wrapping the methods the runner calls
    (for the length of a `with`; phases do not nest: a fork's ForkSession is built before
    fork() is called)."""

    WRAPPED = {"record parents": (RecordSession, "run"), "open ForkSessions": (ForkSession, "__init__"),
               "write children": (ForkSession, "fork"), "estimate": (Experiment, "estimate")}

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._originals: list = []

    def __enter__(self):
        for phase, (owner, attr) in self.WRAPPED.items():
            original = owner.__dict__[attr]
            self._originals.append((owner, attr, original))

            def wrapper(*args, _original=original, _phase=phase, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds[_phase] += time.perf_counter() - start
                    self.calls[_phase] += 1

            setattr(owner, attr, wrapper)
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._originals):
            setattr(owner, attr, original)


@pytest.mark.benchmark(group="experiment throughput")
def test_experiment_throughput(benchmark, smoke, tmp_path):
    spec = tiny_spec(smoke)
    folders = iter(range(1_000_000))

    def experiment() -> dict:
        with Phases() as phases:
            start = time.perf_counter()
            Experiment(spec, tmp_path / f"exp-{next(folders)}").run(progress=False)
            total = time.perf_counter() - start
        return {"total_s": total, "seconds": dict(phases.seconds), "calls": dict(phases.calls)}

    timing = Interleaved({"experiment": experiment})
    timing.run(benchmark, rounds=1 if smoke else ROUNDS, warmup=0 if smoke else WARMUP)
    runs = timing.kept("experiment", results=True)
    best = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]  # the median round, by wall time
    children = best["calls"]["write children"]
    phases_s = dict(best["seconds"])
    phases_s["rest"] = best["total_s"] - sum(phases_s.values())
    benchmark.extra_info.update({
        "smoke": smoke, "rounds": timing.measured_rounds, "program": spec.program, "seeds": len(spec.seeds),
        "arms": len(spec.arms), "fork_steps": spec.fork_steps, "steps": spec.steps,
        "child_steps": spec.steps - spec.fork_steps[0], "children": children,
        "median_ms": {"experiment": 1e3 * best["total_s"]},
        "forks_per_minute": 60 * children / best["total_s"],
        "forks_per_minute_writing_only": 60 * children / best["seconds"]["write children"],
        "phase_s": phases_s,
        "goals": [],
    })
    check_info(benchmark.extra_info, ["children", "forks_per_minute", "forks_per_minute_writing_only", "phase_s"])
    assert children == len(spec.seeds) * len(spec.arms) * len(spec.fork_steps)
