"""Kill a `replay` CLI recording with SIGKILL at a known moment, for the kill -9 tests.

The recording runs in a child process whose Engine.run_step is wrapped: once `target` steps are
complete it prints "ready" (the test waits for that line, so no trial can miss the run however
loaded the machine is) and from then on takes at least `step_sleep` seconds a step, which leaves
the test time to kill it before the run completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RECORDER = """
import sys, time
from replay.engine import Engine

target, step_sleep = int(sys.argv[1]), float(sys.argv[2])
run_step = Engine.run_step

def slowed(self):
    record = run_step(self)
    if self.completed == target:
        print("ready", flush=True)
    if self.completed >= target:
        time.sleep(step_sleep)
    return record

Engine.run_step = slowed
from replay.cli import main
sys.exit(main(sys.argv[3:]))
"""


def kill_when_ready(folder: Path, target: int, cli_args: list[str], *, step_sleep: float = 0.02,
                    after_ready: float = 0.0) -> None:
    """Run `replay <cli_args>` (a recording) in a child, wait until it has completed `target`
    steps, sleep `after_ready` seconds, then SIGKILL it."""
    script = Path(folder) / "killed_recorder.py"
    script.write_text(RECORDER)
    cmd = [sys.executable, str(script), str(target), str(step_sleep), *map(str, cli_args)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(after_ready)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
