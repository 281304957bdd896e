"""examples/cifar_like.py, the run people actually train (issue 10, item 5): a small ResNet
under bf16 autocast, crop and flip drawn in __getitem__ by 2 data-loader workers, 2 micro-batches per step, clipping,
an EMA teacher and OneCycleLR. Recorded briefly, it verifies; killed with -9 it resumes bit for
bit; a placebo fork equals it; a short experiment over it runs, its placebo exactly zero."""

from pathlib import Path

import pytest

from replay.experiment import Arm, Experiment, ExperimentSpec
from replay.fork import ForkSession
from replay.program import load_program
from replay.session import RecordSession, ReplaySession
from replay.store import RunDir

from killing import kill_when_ready

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "examples" / "cifar_like.py")
PROGRAM = f"{EXAMPLE}:program"
STEPS, EVERY = 12, 4


def rows(run):
    with RunDir.open(run) as r:
        return [(row.step, row.batch_hash, row.digest, row.loss, row.metrics.get("grad_norm")) for row in r.ledger.rows()]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar") / "run"
    RecordSession(PROGRAM, out, seed=1, steps=STEPS, checkpoint_every=EVERY, progress=False).run()
    return out


def test_the_example_is_what_the_issue_asks_for():
    program, _ = load_program(PROGRAM)
    assert program.workers == 2 and program.accumulate == 2 and program.clip_grad_norm is not None
    assert program.autocast == "bf16"
    assert program.ema_decay is not None and program.scheduler is not None and not program.indexes_tensors


def test_records_and_verifies_from_every_checkpoint(recorded):
    assert len(rows(recorded)) == STEPS and all(r[4] is not None for r in rows(recorded))  # grad_norm per step
    for start in (0, 9):  # from the program itself, and restored from checkpoint 8
        report = ReplaySession(recorded).verify(start, None, progress=False)
        assert report.ok, report.describe()


def test_kill_9_then_resume_is_bit_identical(recorded, tmp_path):
    out = tmp_path / "killed"
    kill_when_ready(tmp_path, 6, ["record", PROGRAM, "--seed", "1", "--steps", STEPS, "--checkpoint-every", EVERY,
                                  "--out", out, "--no-progress"], step_sleep=0.5, after_ready=0.1)
    with RunDir.open(out) as run:
        assert not run.is_complete
    RecordSession.resume(out, progress=False, say=lambda message: None)
    assert rows(out) == rows(recorded)


def test_placebo_fork_equals_its_parent(recorded, tmp_path):
    child = tmp_path / "placebo"
    ForkSession(recorded, 6, progress=False).fork(child, "placebo")
    assert rows(child) == [r for r in rows(recorded) if r[0] >= 6]


def test_a_short_experiment_runs(tmp_path):
    spec = ExperimentSpec(
        name="cifar-like test", program=PROGRAM, seeds=[1, 2], fork_steps=[4], steps=8,
        arms=[Arm("placebo", ["placebo"]), Arm("bn_reset", ["reset_bn"]), Arm("bitflip", ["bitflip"], reference=True)],
        horizons=[0, 2], primary_horizon=2, probe={"source": f"{EXAMPLE}:probe"}, bootstrap_resamples=100)
    results = Experiment(spec, tmp_path / "exp").run(progress=False)
    assert results["placebo"]["exact_zero"] is True
    bn = [e for e in results["estimates"] if e["arm"] == "bn_reset" and e["horizon"] == 2 and e["distance"] == "tv"]
    assert bn and all(v > 0 for v in bn[0]["per_seed"])  # resetting BatchNorm statistics moves the probe outputs
