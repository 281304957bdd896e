"""Benchmark: fork latency against checkpoint spacing.

    python benches/fork_latency.py [--program examples/digits_mlp.py:program] [--steps 400]
                                   [--child-steps 20] [--rounds 5] [--quick]

A parent is recorded with a checkpoint every 10, 50 and 200 steps. For fork steps T at several
distances d from the checkpoint before them it times `ForkSession(parent, T)`: restore that
checkpoint, then replay d steps checking each against the parent's ledger. A least-squares line
over all the points gives the restore cost (intercept) and the cost of a replayed step (slope),
and the table sets each measurement beside that prediction: fork cost = restore + d steps.

A second table times what each further child of one ForkSession costs (a placebo child of
--child-steps steps written to disk, starting from the session's in-memory state), against
recording the same number of steps from scratch, a one-off `replay.fork.fork` (session + child)
and an in-memory placebo check. Timings are interleaved (every candidate once per round) medians.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _timing import interleaved_medians  # noqa: E402

from replay.fork import ForkSession, fork  # noqa: E402
from replay.session import RecordSession  # noqa: E402
from replay.store import RunDir  # noqa: E402

SPACINGS = (10, 50, 200)


def fork_steps(every: int, steps: int) -> list[tuple[int, int]]:
    """(fork step, distance from the checkpoint before it): distances 0, ~1/4, ~1/2 and every-1
    past the checkpoint at `every` (or at the last full interval a short parent has)."""
    base = every if 2 * every <= steps else max(0, (steps - 1) // every * every)
    distances = sorted({0, every // 4, every // 2, every - 1})
    return [(base + d, d) for d in distances if base + d < steps]


def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y against x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def checkpoint_bytes(run: Path) -> int:
    folders = sorted((run / "checkpoints").iterdir())
    return sum(p.stat().st_size for p in folders[-1].iterdir())


def load_note() -> str:
    """The 1-minute load average: other processes on the cores inflate every figure here."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    busy = "  (BUSY: other processes share the CPUs, timings are inflated)" if load > 0.75 * cpus else ""
    return f"load average {load:.1f} on {cpus} CPUs{busy}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", default=str(HERE.parent / "examples" / "digits_mlp.py") + ":program")
    parser.add_argument("--steps", type=int, default=400, help="parent length (at least 2 x 200 for every spacing)")
    parser.add_argument("--child-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a short parent, one round")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.child_steps, args.rounds = 120, 5, 1
    command = "python benches/fork_latency.py" + "".join(f" {a}" for a in sys.argv[1:])
    program = os.path.relpath(args.program.rsplit(":", 1)[0], HERE.parent)
    print(f"`{command}`\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; program {program}, parent of "
          f"{args.steps} steps; {args.rounds} interleaved rounds, medians; {load_note()}\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fresh = (tmp / f"out-{i}" for i in itertools.count())
        parents, record_ms = {}, {}
        for every in SPACINGS:
            parents[every] = tmp / f"parent-{every}"
            start = time.perf_counter()
            RecordSession(args.program, parents[every], steps=args.steps, checkpoint_every=every, progress=False).run()
            record_ms[every] = (time.perf_counter() - start) * 1e3 / args.steps
        size = checkpoint_bytes(parents[SPACINGS[0]])

        # Table 1: ForkSession construction against the distance from the checkpoint before T.
        candidates, where = {}, {}
        for every in SPACINGS:
            for at, distance in fork_steps(every, args.steps):
                key = f"{every}/{at}"
                where[key] = (every, at, distance)
                candidates[key] = lambda p=parents[every], t=at: ForkSession(p, t, progress=False)
        medians = {k: v * 1e3 for k, v in interleaved_medians(candidates, args.rounds, warmup=1).items()}
        restore, per_step = linear_fit([(where[k][2], ms) for k, ms in medians.items()])
        print("### ForkSession(parent, T): restore the checkpoint before T, replay to T\n")
        print(f"checkpoint size {size / 1e3:.0f} kB; least-squares fit over all rows: fork ms = {restore:.1f} "
              f"(restore: load the program, build the engine, read the checkpoint) + {per_step:.2f} x steps "
              "replayed\n")
        print("| checkpoint every | fork step T | steps replayed (T - checkpoint) | ForkSession ms | "
              "restore + steps x slope ms | measured / fit | recording ms/step |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for key, ms in medians.items():
            every, at, distance = where[key]
            fit = restore + per_step * distance
            print(f"| {every} | {at} | {distance} | {ms:.1f} | {fit:.1f} | {ms / fit:.2f} | {record_ms[every]:.2f} |")
        print()
        for every in SPACINGS:
            mean = restore + per_step * (every - 1) / 2
            print(f"- checkpoint every {every}: a fork at a uniformly random step costs {mean:.0f} ms on average, "
                  f"{restore + per_step * (every - 1):.0f} ms at worst")
        print()

        # Table 2: each further child of one session, against recording the same steps.
        every = 50 if 50 in parents else SPACINGS[0]
        at = fork_steps(every, args.steps)[-1][0]
        at = min(at, args.steps - args.child_steps)
        n = args.child_steps
        session = ForkSession(parents[every], at, progress=False)
        with RunDir.open(parents[every]) as run:
            schedule = run.manifest["checkpoints"]["every"]
        child = {
            f"each further child: placebo fork of {n} steps (written)":
                lambda: session.fork(next(fresh), "placebo", steps=n),
            f"each further child: reset_exp_avg fork of {n} steps (written)":
                lambda: session.fork(next(fresh), "reset_exp_avg", steps=n),
            f"recording {n} steps from scratch (RecordSession, checkpoint every {schedule})":
                lambda: RecordSession(args.program, next(fresh), steps=n, checkpoint_every=schedule,
                                      progress=False).run(),
            f"in-memory placebo check of {n} steps (nothing written)":
                lambda: session.placebo_check(n),
            f"one-off replay.fork.fork at T={at}: session + one child":
                lambda: fork(parents[every], next(fresh), at=at, perturb="placebo", steps=n, progress=False),
        }
        medians = {k: v * 1e3 for k, v in interleaved_medians(child, args.rounds, warmup=1).items()}
        first = next(iter(medians))
        print(f"### Children of one ForkSession (parent with a checkpoint every {every}, T = {at}, "
              f"{at - at // every * every} steps past a checkpoint)\n")
        print("| what | median ms | ms per step | / each further placebo child |")
        print("|---|---:|---:|---:|")
        for name, ms in medians.items():
            step = "-" if name.startswith("one-off") else f"{ms / n:.2f}"
            print(f"| {name} | {ms:.1f} | {step} | {ms / medians[first]:.2f} |")
        session_ms = restore + per_step * (at - at // every * every)
        k = 8
        print(f"\n{k} children of step {at}: one session + {k} children = {session_ms + k * medians[first]:.0f} ms, "
              f"{k} separate fork() calls = {k * list(medians.values())[-1]:.0f} ms")
        print(f"\nat the end: {load_note()}")


if __name__ == "__main__":
    main()
