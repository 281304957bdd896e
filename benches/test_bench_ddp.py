"""Recording by several processes (replay.distributed) against one, at the same global batch.

benches/programs/ddp_mlp.py (an MLP of about 300,000 parameters, batches of 256, AdamW), recorded
with the `replay record` command by each candidate, interleaved within a round:

    1 process, 1 thread     OMP_NUM_THREADS=1 replay record ...
    1 process, 2 threads    OMP_NUM_THREADS=2 replay record ...
    --nproc 1               the launcher and the rank protocol with one rank (1 thread)
    --nproc 2               two ranks, 128 examples each, 1 thread each (the launcher's default)

A command's wall time includes its start-up (Python, torch, the program; for --nproc, every
rank's and the process group's), so each candidate records twice, `steps` and `short` steps, and
the figure is the time per step of the difference: (T(steps) - T(short)) / (steps - short),
steady-state recording with checkpoints, without start-up. The start-up is shown apart (T(short)
less `short` steps at that rate). `--nproc 1` and one process with one thread record the same
bits (checked every round: a world of one is a plain recording). No goal: the gain depends on the
free cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._timing import Interleaved, check_info

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = "benches/programs/ddp_mlp.py:program"
ROUNDS, WARMUP = 3, 1
CANDIDATES = {"1 process, 1 thread": (None, "1"), "1 process, 2 threads": (None, "2"), "--nproc 1": (1, "1"),
              "--nproc 2": (2, "1")}


def _record(out: Path, steps: int, nproc: int | None, threads: str) -> float:
    command = [sys.executable, "-m", "replay.cli", "record", PROGRAM, "--out", str(out), "--steps", str(steps),
               "--no-progress"] + (["--nproc", str(nproc)] if nproc else [])
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    return elapsed


def _digests(path: Path) -> list[int]:
    from replay.store import RunDir

    with RunDir.open(path) as run:
        return [row.digest for row in run.ledger.rows()]


@pytest.mark.benchmark(group="distributed recording")
def test_ddp_recording_overhead(benchmark, smoke, tmp_path):
    steps, short = (6, 2) if smoke else (300, 50)
    folders = iter(range(1_000_000))

    def candidate(nproc, threads):
        def run() -> dict:
            n = next(folders)
            long_s = _record(tmp_path / f"long-{n}", steps, nproc, threads)
            short_s = _record(tmp_path / f"short-{n}", short, nproc, threads)
            return {"long_s": long_s, "short_s": short_s, "run": str(tmp_path / f"long-{n}")}
        return run

    # Smoke mode leaves out the 2-thread process (the same code as 1 thread): 6 commands, not 8.
    names = [n for n in CANDIDATES if not (smoke and n == "1 process, 2 threads")]
    timing = Interleaved({name: candidate(*CANDIDATES[name]) for name in names})
    timing.run(benchmark, rounds=1 if smoke else ROUNDS, warmup=0 if smoke else WARMUP)
    figures = {}
    for name in names:
        runs = timing.kept(name, results=True)
        per_step = sorted((r["long_s"] - r["short_s"]) / (steps - short) for r in runs)
        step_s = per_step[len(per_step) // 2]
        start = sorted(r["short_s"] - short * step_s for r in runs)
        figures[name] = {"step_ms": 1e3 * step_s, "startup_s": start[len(start) // 2]}
    for name, figure in figures.items():
        figure["vs_1_thread"] = figure["step_ms"] / figures["1 process, 1 thread"]["step_ms"]
        two = figures.get("1 process, 2 threads")
        figure["vs_2_threads"] = figure["step_ms"] / two["step_ms"] if two else None
    # A world of one records the bits of one process with one thread, in every round.
    for plain, one in zip(timing.kept("1 process, 1 thread", results=True), timing.kept("--nproc 1", results=True)):
        assert _digests(Path(plain["run"])) == _digests(Path(one["run"]))
    benchmark.extra_info.update({
        "smoke": smoke, "rounds": timing.measured_rounds, "program": PROGRAM, "steps": steps, "short": short,
        "batch_size": 256, "median_ms": {name: f["step_ms"] for name, f in figures.items()},
        "candidates": figures, "goals": [],
    })
    check_info(benchmark.extra_info, ["candidates", "steps", "short", "batch_size"])
