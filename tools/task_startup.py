"""How long a fresh process takes to start an experiment task: import torch, import replay, then
record one step of a program (load it, build the engine, run the step, write the run).

    python tools/task_startup.py [--program replay.demo:adamw_program] [--runs 5]

Each run is a new interpreter (as an experiment worker or a Ray worker is); the medians of the
phases are printed with the heavy modules the process ended up importing (torch._dynamo,
sklearn). A measuring tool, not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, os, sys, tempfile, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import replay
from replay.session import RecordSession
t2 = time.perf_counter()
RecordSession(sys.argv[1], os.path.join(sys.argv[2], "run"), seed=1, steps=1, progress=False).run()
t3 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "replay": t2 - t1, "first step": t3 - t2, "total": t3 - t0,
                  "loaded": sorted(m for m in ("torch._dynamo", "sklearn") if m in sys.modules)}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", default="replay.demo:adamw_program")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as folder:
            done = subprocess.run([sys.executable, "-c", CHILD, args.program, folder], check=True,
                                  capture_output=True, text=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for phase in ("torch", "replay", "first step", "total"):
        values = [r[phase] for r in runs]
        print(f"{phase:>10}: median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})")
    print(f"    loaded: {', '.join(runs[0]['loaded']) or 'neither torch._dynamo nor sklearn'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
