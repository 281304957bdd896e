"""The cost of tracing a step (issue 12): a step of the engine (the program's step function,
the fingerprints of every component) with and without `replay.trace`'s op tracer around its step
function, the tracer streaming every op (module, source line, input and output fingerprints) to
a JSON-lines file.

Both candidates advance the same kind of engine by the same number of steps each round,
interleaved; the figure is the traced step's time over the untraced step's, with the ops per step
and the cost per op. No goal: a trace is a debugging tool run on one step at a time; the figure
is tracked and stated in the README.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import pytest

from replay.engine import Engine
from replay.program import load_program
from replay.trace import _TraceWriter, tracing_engine

from ._loops import PROGRAMS
from ._timing import Interleaved, check_info

STEPS = 10
ROUNDS = {"digits MLP": 9, "5M MLP": 5}


@pytest.mark.benchmark(group="trace")
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_trace_cost(benchmark, smoke, program, tmp_path):
    loaded, _ = load_program(PROGRAMS[program])
    steps = 2 if smoke else STEPS
    plain_engine = Engine(loaded, Engine.contract_for(loaded))
    traced_engine = Engine(loaded, Engine.contract_for(loaded))
    ops_per_step: list[int] = []
    bytes_per_step: list[int] = []

    def plain():
        for _ in range(steps):
            plain_engine.run_step()

    def traced():
        with tempfile.TemporaryDirectory(prefix="replay-bench-", dir=tmp_path) as folder:
            path = Path(folder) / "trace.jsonl"
            writer = _TraceWriter(path, {"format": "replay.trace", "version": 1})
            with tracing_engine(traced_engine, writer):
                for _ in range(steps):
                    traced_engine.run_step()
            writer.commit({})
            ops_per_step.append(writer.count / steps)
            bytes_per_step.append(path.stat().st_size / steps)

    timing = Interleaved({"step": plain, "traced step": traced})
    timing.run(benchmark, rounds=1 if smoke else ROUNDS[program], warmup=0 if smoke else 1)
    med = timing.medians_ms()
    step_ms, traced_ms = med["step"] / steps, med["traced step"] / steps
    ops = statistics.median(ops_per_step)
    benchmark.extra_info.update({
        "smoke": smoke, "rounds": timing.measured_rounds, "program": program, "steps_per_round": steps,
        "median_ms": {"step": step_ms, "traced step": traced_ms},
        "step_ms": step_ms, "traced_step_ms": traced_ms, "ratio": traced_ms / step_ms,
        "ops_per_step": ops, "us_per_op": 1e3 * (traced_ms - step_ms) / ops,
        "trace_kib_per_step": statistics.median(bytes_per_step) / 1024,
        "goals": [],
    })
    check_info(benchmark.extra_info, ["program", "step_ms", "traced_step_ms", "ratio", "ops_per_step"])
