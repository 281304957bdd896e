"""Forget vs full retraining (issue 13).

One parent run of benches/programs/one_epoch_mlp.py (600 steps: one epoch, checkpoints every
100) is recorded once. For ids first seen at 10%, 50% and 90% of the run (two ids each, first
seen at exactly that step), each round times, interleaved:

* `forget(parent, ids, out)`: plan (scan the ledger), open the fork (restore the checkpoint
  before T, replay to T checking the parent's ledger), replay the tail without the ids, write the
  certificate;
* the full retraining it equals: `RecordSession(program, drop_examples=ids)`, from step 0.

Both write a complete run directory (ledger, checkpoints). The figure is forget's time over the
retraining's, per share; the share of steps replayed, 1 - T / steps, is its floor before the
restore and the replay to T. No goal: the figure is tracked (SISA's reported speed-ups over
retraining, 1.36x to 4.63x, are the anchor the README compares with).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

import pytest

from replay.forget import forget, plan_forget
from replay.session import RecordSession
from replay.store import RunDir

from ._timing import Interleaved, check_info

HERE = Path(__file__).resolve().parent
PROGRAM = str(HERE / "programs" / "one_epoch_mlp.py") + ":program"
SHARES = (0.1, 0.5, 0.9)
ROUNDS = 5
SMOKE_STEPS, SMOKE_EVERY = 40, 10


def ids_first_seen_at(parent: Path, step: int, count: int = 2) -> list[int]:
    with RunDir.open(parent) as run:
        batches = {s: ids for s, ids, _ in run.ledger.batches()}
    before = {i for s, ids in batches.items() if s < step for i in ids}
    fresh = [i for i in dict.fromkeys(batches[step]) if i not in before]
    assert len(fresh) >= count, f"fewer than {count} ids are first seen at step {step}"
    return sorted(fresh[:count])


@pytest.mark.benchmark(group="forget")
def test_forget_vs_retraining(benchmark, smoke, tmp_path):
    steps = SMOKE_STEPS if smoke else 600
    every = SMOKE_EVERY if smoke else 100
    parent = RecordSession(PROGRAM, tmp_path / "parent", steps=steps, checkpoint_every=every, progress=False).run()
    cases = {}
    for share in SHARES:
        t = int(share * steps)
        ids = ids_first_seen_at(parent, t)
        assert plan_forget(parent, ids).fork_step == t
        cases[share] = (t, ids)

    def timed(make):
        def call():
            with tempfile.TemporaryDirectory(prefix="replay-bench-", dir=tmp_path) as out:
                make(Path(out) / "run")
        return call

    candidates = {}
    for share, (t, ids) in cases.items():
        candidates[f"forget {share:.0%}"] = timed(lambda out, ids=ids: forget(parent, ids, out, progress=False))
        candidates[f"retrain {share:.0%}"] = timed(
            lambda out, ids=ids: RecordSession(PROGRAM, out, steps=steps, checkpoint_every=every, progress=False,
                                               drop_examples=ids).run())
    timing = Interleaved(candidates)
    timing.run(benchmark, rounds=1 if smoke else ROUNDS, warmup=0)
    med = timing.medians_ms()
    rows = []
    for share, (t, ids) in cases.items():
        f, r = med[f"forget {share:.0%}"], med[f"retrain {share:.0%}"]
        rows.append({"share_first_seen": share, "fork_step": t, "ids": ids, "steps_replayed": steps - t,
                     "share_replayed": (steps - t) / steps, "forget_ms": f, "retrain_ms": r,
                     "forget_over_retrain": f / r, "speedup": r / f})
    shutil.rmtree(parent, ignore_errors=True)
    benchmark.extra_info.update({
        "smoke": smoke, "rounds": timing.measured_rounds, "program": "one-epoch MLP", "steps": steps,
        "checkpoint_every": every, "cases": rows,
        "median_ms": med, "spread": {k: statistics.pstdev(timing.kept(k)) * 1e3 for k in candidates},
        "goals": [],
    })
    check_info(benchmark.extra_info, ["cases", "steps"])
