"""Benchmark: fork latency against checkpoint spacing.

    python benches/fork_latency.py [--steps 300] [--child-steps 20] [--quick]

A parent (examples/digits_mlp.py) is recorded with checkpoints every 10, 50 and 200 steps. For
fork steps at several distances from the checkpoint before them it times the ForkSession (restore
the checkpoint, replay to the fork step checking every step against the ledger), then each child
made from that session (a placebo child run for --child-steps steps, written to disk), and prints
them next to the time one recorded step takes: fork cost = restore + (distance) steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from replay.fork import ForkSession  # noqa: E402
from replay.session import RecordSession  # noqa: E402

PROGRAM = str(HERE.parent / "examples" / "digits_mlp.py") + ":program"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--child-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.child_steps, args.repeats = 120, 5, 1
    print(f"program {PROGRAM.split('/')[-1]}, parent of {args.steps} steps, medians of {args.repeats}\n")
    print("| checkpoint every | fork step | steps replayed to reach it | ForkSession (restore + replay) ms "
          "| each child (placebo, %d steps) ms | recorded step ms |" % args.child_steps)
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for every in (10, 50, 200):
            parent = Path(tmp) / f"parent-{every}"
            start = time.perf_counter()
            RecordSession(PROGRAM, parent, steps=args.steps, checkpoint_every=every, progress=False).run()
            per_step = (time.perf_counter() - start) / args.steps
            last = args.steps - args.child_steps
            for fork_step in sorted({min(every, last), min(every + every // 2, last), min(2 * every - 1, last)}):
                distance = fork_step - max(c for c in range(0, fork_step + 1, every))
                sessions, children = [], []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    session = ForkSession(parent, fork_step, progress=False)
                    t1 = time.perf_counter()
                    session.fork(Path(tmp) / f"child-{every}-{fork_step}-{r}", "placebo", steps=args.child_steps)
                    t2 = time.perf_counter()
                    sessions.append(t1 - t0)
                    children.append(t2 - t1)
                print(f"| {every} | {fork_step} | {distance} | {statistics.median(sessions) * 1e3:.0f} | "
                      f"{statistics.median(children) * 1e3:.0f} | {per_step * 1e3:.1f} |")


if __name__ == "__main__":
    main()
