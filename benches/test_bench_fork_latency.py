"""Fork latency: what a fork costs to open and what each step of a fork child costs.

A parent of each program is recorded once (checkpoints on the program's default schedule).
Each round, in alternating order:

* ForkSession(parent, T) with T at a checkpoint (restore only: load the program, build the
  engine, read and check the checkpoint) and with T `d` steps past it (restore, then replay d
  steps checking each against the parent's ledger): the difference over d prices a replayed step;
* a placebo child of that session (`session.fork(...)`), run in lockstep with the bare loop of
  benches/_loops.py (one bare step after each child step, from the child's observe callback).

Goal: a fork child's step within 10% of the bare step (clean steps: the median of paired
differences over the median bare step; the child's checkpoints, at its first and last step, are
set apart and shown as its steady state with the default spacing).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import pytest

from replay.fork import ForkSession
from replay.session import RecordSession

from ._loops import PROGRAMS, Lockstep, program_facts
from ._timing import Interleaved, check_info, goal

# name: rounds when measuring. Steps: the parent runs to the checkpoint at `every`, then
# 60% further; the child starts at it and runs 40% of a spacing; the second fork step lies
# a quarter of a spacing past it.
ROUNDS = {"digits MLP": 5, "5M MLP": 3}
SMOKE_EVERY = 4


@pytest.mark.benchmark(group="fork latency")
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_fork_latency(benchmark, smoke, program, tmp_path):
    ref = PROGRAMS[program]
    facts = program_facts(ref)
    every = SMOKE_EVERY if smoke else facts["checkpoint_every"]
    parent_steps = every + max(6, int(0.6 * every))
    at, later = every, every + max(1, every // 4)
    child_steps = max(5, int(0.4 * every))
    parent = tmp_path / "parent"
    RecordSession(ref, parent, steps=parent_steps, checkpoint_every=every, progress=False).run()

    def child() -> dict:
        session = ForkSession(parent, at, progress=False)
        lockstep = Lockstep(ref)
        with lockstep.counting(), tempfile.TemporaryDirectory(prefix="replay-bench-", dir=tmp_path) as out:
            start = time.perf_counter()
            session.fork(Path(out) / "child", "placebo", steps=child_steps, observe=lockstep)
            lockstep.finish()
            fork_s = time.perf_counter() - start
        return {**lockstep.summary(every), "fork_call_ms": 1e3 * fork_s}

    def open_session(t: int) -> None:
        ForkSession(parent, t, progress=False)  # dropped at once: rounds keep no 57 MB states alive

    timing = Interleaved({
        "ForkSession at a checkpoint": lambda: open_session(at),
        f"ForkSession {later - at} steps past it": lambda: open_session(later),
        "placebo child": child,
    })
    timing.run(benchmark, rounds=1 if smoke else ROUNDS[program], warmup=0 if smoke else 1)
    med = timing.medians_ms()
    children = timing.kept("placebo child", results=True)
    numeric = [k for k, v in children[0].items() if isinstance(v, (int, float))]
    summary = {k: statistics.median(c[k] for c in children) for k in numeric}
    summary["kinds"] = children[-1]["kinds"]
    restore = med["ForkSession at a checkpoint"]
    replayed_step = (med[f"ForkSession {later - at} steps past it"] - restore) / (later - at)
    benchmark.extra_info.update({
        "smoke": smoke, "rounds": timing.measured_rounds, "program": program, "parameters": facts["parameters"],
        "checkpoint_every": every, "parent_steps": parent_steps, "fork_step": at, "child_steps": child_steps,
        "steps_replayed": later - at,
        "median_ms": {"ForkSession at a checkpoint": restore,
                      "ForkSession past it": med[f"ForkSession {later - at} steps past it"],
                      "child fork() call": summary["fork_call_ms"]},
        "restore_ms": restore, "replayed_step_ms": replayed_step,
        "child": summary,
        "goals": [goal(f"fork child's step vs bare step, {program}", summary["per_step"], "<=", 0.10, "%",
                       "within 10% of the bare step")],
    })
    check_info(benchmark.extra_info, ["program", "restore_ms", "replayed_step_ms", "child", "child_steps"])
