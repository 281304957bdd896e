"""What data-loader workers gain on a CPU-heavy augmentation (Program.workers, issue 10).

benches/programs/augmented_images.py: every example is cropped, flipped, blurred four times and
jittered in __getitem__, with a linear model, so building the batch is most of a step. Three
engines (workers = 0, 1, 2) advance WARMUP + STEPS steps each per round, interleaved; the workers
are started when an engine's turn begins and stopped when it ends (so nothing is built for it
while the others run), and only the last STEPS steps are timed: the steady state, without the
start-up (a fork per worker) and the pipeline filling. Figures: each engine's step
time and the speed-up over workers = 0, in one run. The ledger digests of the three must agree
(the same bits for any number of workers), and the bench fails if they do not. No goal: the
gain depends on the cores free (this machine has 2, shared with the main process).
"""

from __future__ import annotations

import statistics
import time

import pytest

from replay.engine import Engine

from ._timing import Interleaved, check_info
from .programs.augmented_images import with_workers

STEPS = 24
WARMUP = 4
ROUNDS = 7
WORKERS = (0, 1, 2)


@pytest.mark.benchmark(group="data workers")
def test_data_workers(benchmark, smoke):
    steps = 2 if smoke else STEPS
    warmup = 1 if smoke else WARMUP
    engines = {n: Engine(p, Engine.contract_for(p)) for n, p in ((n, with_workers(n)) for n in WORKERS)}
    digests: dict[int, list[int]] = {n: [] for n in WORKERS}

    def advance(n):
        def run():
            # Workers are started at the engine's turn and stopped at its end: left running, they
            # would prefetch while the other engines run (batches for free) and take their cores.
            # The start (a fork each) and the first WARMUP steps (the pipeline filling) are not
            # timed: the figure is the steady state of a long run. The candidate times itself.
            engines[n].start_workers()
            for _ in range(warmup):
                digests[n].append(engines[n].run_step().digest)
            start = time.perf_counter()
            for _ in range(steps):
                digests[n].append(engines[n].run_step().digest)
            seconds = time.perf_counter() - start
            engines[n].close()
            return seconds
        return run

    try:
        timing = Interleaved({f"workers={n}": advance(n) for n in WORKERS})
        timing.run(benchmark, rounds=1 if smoke else ROUNDS, warmup=0 if smoke else 1)
    finally:
        for engine in engines.values():
            engine.close()
    assert digests[1] == digests[0] and digests[2] == digests[0], "workers changed the bits"
    step_ms = {n: 1e3 * statistics.median(timing.kept(f"workers={n}", results=True)) / steps for n in WORKERS}
    benchmark.extra_info.update({
        "smoke": smoke, "rounds": timing.measured_rounds, "steps_per_round": steps, "warmup_steps": warmup,
        "batch_size": 64,
        "median_ms": {f"workers={n}": step_ms[n] for n in WORKERS},
        "step_ms": {str(n): step_ms[n] for n in WORKERS},
        "speedup": {str(n): step_ms[0] / step_ms[n] for n in WORKERS},
        "goals": [],
    })
    check_info(benchmark.extra_info, ["step_ms", "speedup"])
