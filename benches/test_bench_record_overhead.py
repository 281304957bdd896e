"""Recording overhead: what RecordSession at default settings costs over the same training loop
without replay (benches/_loops.py describes the loops), on two programs: the digits MLP of
examples/digits_mlp.py (BatchNorm, dropout, AdamW, EMA teacher; a step is a millisecond or two)
and the ~5M-parameter MLP of benches/programs/five_million.py (tens of ms a step on 2 cores).

Each round runs, in alternating order: the bare loop, the torch.optim loop and a recording as
whole runs (seconds per step, setup excluded from the loops, included in the recording), and a
lockstep recording (a bare step after each recorded step). The goal figure is the lockstep's
steady state: the median clean-step cost plus the checkpoints' excess amortised over the
program's default checkpoint spacing and the epoch records' excess over their rate. Whole runs
are shown beside it: their checkpoints at both ends weigh more in a short run than in a long
one. After the rounds, one instrumented recording says where the time goes (the cause of a gap).

Goals: steady state <= 3% on the 5M MLP; <= 10% on the digits MLP with a fixed per-step cost
<= 0.15 ms.
"""

from __future__ import annotations

import os
import statistics

import pytest

from ._loops import PROGRAMS, bare_run, breakdown, lockstep_recording, program_facts, recorded_run
from ._timing import Interleaved, check_info, goal

# name: (steps, rounds) when measuring; (steps, checkpoint every) in smoke mode. The 5M MLP runs
# 200 of its 300 default steps (checkpoints at 0, 100, 200): each round holds three whole runs
# and a lockstep recording, the suite's longest bench, and the steady state does not depend on
# the run's length (checkpoints are amortised over the program's own spacing, 100 steps).
FULL = {"digits MLP": (300, 5), "5M MLP": (200, 3)}
SMOKE = {"digits MLP": (30, 10), "5M MLP": (4, None)}  # digits covers mid-run checkpoints


@pytest.mark.benchmark(group="recording overhead")
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_record_overhead(benchmark, smoke, program):
    ref = PROGRAMS[program]
    facts = program_facts(ref)
    if smoke:
        (steps, every), rounds = SMOKE[program], 1
    else:
        (steps, rounds), every = FULL[program], None  # None: the program's own schedule
    spacing = every or facts["checkpoint_every"]

    if not smoke:
        # Warm-up outside the rounds (allocator, caches, lazy imports): a full warm-up round
        # would cost as much as a measured one.
        bare_run(ref, 3, "replay")
        bare_run(ref, 3, "torch")
        recorded_run(ref, 3, every)

    timing = Interleaved({
        "bare": lambda: bare_run(ref, steps, "replay"),
        "torch.optim": lambda: bare_run(ref, steps, "torch"),
        "recorded": lambda: recorded_run(ref, steps, every),
        "lockstep": lambda: lockstep_recording(ref, steps, every).summary(spacing),
    })
    timing.run(benchmark, rounds=rounds, warmup=0)
    bare = timing.kept("bare", results=True)
    plain = timing.kept("torch.optim", results=True)
    runs = timing.kept("recorded", results=True)
    rec = [r["per_step"] for r in runs]
    over = [r / b - 1 for r, b in zip(rec, bare)]
    lock = timing.kept("lockstep", results=True)
    numeric = [k for k, v in lock[0].items() if isinstance(v, (int, float))]
    lockstep = {k: statistics.median(d[k] for d in lock) for k in numeric}
    lockstep["kinds"] = lock[-1]["kinds"]
    lockstep["steady_state_by_round"] = [d["steady_state"] for d in lock]
    stored = runs[-1]
    parts = breakdown(ref, steps, every, kernel_rounds=2 if smoke else 40)

    info = {
        "smoke": smoke, "rounds": timing.measured_rounds, "program": program,
        "reference": os.path.relpath(ref.rsplit(":", 1)[0], os.path.dirname(os.path.dirname(__file__))),
        "parameters": facts["parameters"], "steps": steps, "checkpoint_every": spacing,
        "median_ms": {"bare": 1e3 * statistics.median(bare), "torch.optim": 1e3 * statistics.median(plain),
                      "recorded": 1e3 * statistics.median(rec)},
        "whole_run": {"overhead": statistics.median(over), "overhead_min": min(over), "overhead_max": max(over),
                      "vs_torch_optim": statistics.median(r / p - 1 for r, p in zip(rec, plain))},
        "lockstep": lockstep,
        "stored": {"ledger_bytes_per_step": stored["ledger_bytes"] / steps,
                   "checkpoint_mb": stored["checkpoint_bytes"] / 1e6, "checkpoints": stored["checkpoints"],
                   "manifest_bytes": stored["manifest_bytes"]},
        "breakdown": parts,
    }
    if program == "5M MLP":
        info["goals"] = [goal("steady-state recording overhead, 5M MLP", lockstep["steady_state"], "<=", 0.03, "%",
                              "<= 3% at default settings")]
    else:
        info["goals"] = [
            goal("steady-state recording overhead, digits MLP", lockstep["steady_state"], "<=", 0.10, "%",
                 "<= 10% at default settings"),
            goal("fixed per-step cost, digits MLP", lockstep["per_step_ms"], "<=", 0.15, "ms", "<= 0.15 ms a step"),
        ]
    benchmark.extra_info.update(info)
    check_info(benchmark.extra_info, ["program", "parameters", "steps", "checkpoint_every", "whole_run", "lockstep",
                                      "stored", "breakdown"])
    for key in ("bare_ms", "per_step_ms", "per_checkpoint_ms", "steady_state", "run_overhead"):
        assert key in lockstep, key
