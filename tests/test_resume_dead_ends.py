"""No dead ends: a recording (or a fork) killed before its first checkpoint was recorded is
resumed from its start, and a resume falls back to the newest intact checkpoint when newer ones
are missing or damaged, saying so. Every resumed run equals an uninterrupted one bit for bit:
its ledger digests and its checkpoint files' hashes."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from replay.fork import ForkSession
from replay.session import RecordSession, ReplaySession, verify_files
from replay.store import RunDir, RunError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TINY = str(HERE / "programs" / "tiny.py") + ":program"
SEED = 6
AT = 13
PERTURB = "reset_exp_avg"


def ledger(path):
    """Everything a bit-identical recording must reproduce: rows, checkpoint hashes, epochs."""
    with RunDir.open(path) as run:
        rows = [(r.step, r.digest, r.batch_hash, r.loss) for r in run.ledger.rows()]
        return rows, run.ledger.checkpoints(), run.ledger.epochs(), run.is_complete


def events(path, kind):
    with RunDir.open(path) as run:
        return [e for e in run.ledger.events() if e["kind"] == kind]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """An uninterrupted recording and an uninterrupted fork of it."""
    folder = tmp_path_factory.mktemp("dead-ends")
    parent = folder / "parent"
    RecordSession(TINY, parent, seed=SEED, progress=False).run()
    child = folder / "child"
    ForkSession(parent, AT, progress=False).fork(child, PERTURB)
    return parent, child


def copy_of(path, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(path, out)
    return out


def stop_after(run_path, step, checkpoint):
    """What a kill leaves: rows through `step`, checkpoints through `checkpoint` recorded (None:
    none), the folders of later checkpoints still on disk but unrecorded, status incomplete."""
    with RunDir.open(run_path, writable=True) as run:
        run.ledger.truncate_after(step, keep_checkpoint=None)
        for s in sorted(run.ledger.checkpoints()):
            if checkpoint is None or s > checkpoint:
                run.ledger.remove_checkpoint(s)
        run.update_manifest({"status": "incomplete"})


def resume(path):
    said = []
    RecordSession.resume(path, progress=False, say=said.append)
    return "\n".join(said)


# ----------------------------------------------------------- killed before checkpoint 0 ---


@pytest.mark.parametrize("rows", [None, 9])
def test_a_recording_with_no_checkpoint_restarts_from_step_0(references, tmp_path, rows):
    parent, _ = references
    out = copy_of(parent, tmp_path, "killed")
    stop_after(out, -1 if rows is None else rows, None)
    said = resume(out)
    assert "no intact checkpoint" in said and "step 0" in said
    assert ledger(out) == ledger(parent)
    assert events(out, "resume")[-1]["detail"]["restarted"] is True
    assert verify_files(out) == [] and ReplaySession(out).verify(progress=False).ok


@pytest.mark.parametrize("rows", [None, AT + 3])
def test_a_fork_with_no_checkpoint_restarts_from_its_fork_step(references, tmp_path, rows):
    parent, child = references
    out = tmp_path / "child"  # next to a copy of the parent: the lineage's relative path holds
    shutil.copytree(child, out)
    shutil.copytree(parent, tmp_path / "parent")
    stop_after(out, AT - 1 if rows is None else rows, None)
    said = resume(out)
    assert "no intact checkpoint" in said and f"fork step {AT}" in said
    assert ledger(out) == ledger(child)
    assert ReplaySession(out).verify(progress=False).ok


def test_a_fork_with_no_checkpoint_and_no_parent_is_refused_clearly(references, tmp_path):
    _, child = references
    out = copy_of(child, tmp_path, "orphan")
    stop_after(out, AT - 1, None)
    with pytest.raises(RunError, match="parent .* is gone"):
        resume(out)


# ------------------------------------------------ falling back to an intact checkpoint ---


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "missing": lambda f: shutil.rmtree(f),
    "flipped": lambda f: _flip(f / "tensors.safetensors"),
    "emptied": lambda f: [p.write_bytes(b"") for p in f.iterdir()],
    "state_deleted": lambda f: (f / "state.json").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint(references, tmp_path, damage):
    parent, _ = references
    out = copy_of(parent, tmp_path, "damaged")
    stop_after(out, 24, 20)  # killed at step 24, checkpoints 0, 10 and 20 recorded
    DAMAGE[damage](out / "checkpoints" / "step-00000020")
    said = resume(out)
    assert "checkpoint 20 is not usable" in said and "resuming from checkpoint 10" in said
    assert ledger(out) == ledger(parent)
    assert events(out, "resume")[-1]["detail"]["skipped_checkpoints"] == [20]
    assert verify_files(out) == [] and ReplaySession(out).verify(progress=False).ok


def test_resume_skips_every_damaged_checkpoint_down_to_a_fresh_start(references, tmp_path):
    parent, _ = references
    out = copy_of(parent, tmp_path, "all-damaged")
    stop_after(out, 24, 20)
    for step in (0, 10, 20):
        _flip(out / "checkpoints" / f"step-{step:08d}" / "state.json")
    said = resume(out)
    assert said.count("is not usable") == 3 and "step 0" in said
    assert ledger(out) == ledger(parent)


def test_a_fork_falls_back_past_a_missing_checkpoint(references, tmp_path):
    parent, child = references
    out = tmp_path / "child"
    shutil.copytree(child, out)
    shutil.copytree(parent, tmp_path / "parent")
    with RunDir.open(out) as run:
        steps = run.checkpoint_steps()
    newest = steps[-2]
    stop_after(out, newest + 2, newest)
    shutil.rmtree(out / "checkpoints" / f"step-{newest:08d}")
    said = resume(out)
    assert f"checkpoint {newest} is not usable" in said
    assert ledger(out) == ledger(child)


# -------------------------------------------------------------------- real kills -------

KILLED_BEFORE_CHECKPOINT = """
import sys, time
from replay import driver

def submit(self, step, state):  # the first checkpoint is due: say so, then wait to be killed
    print("ready", flush=True)
    time.sleep(600)

driver._CheckpointWriter.submit = submit
kind, out = sys.argv[1], sys.argv[2]
if kind == "record":
    from replay.session import RecordSession
    RecordSession(sys.argv[3], out, seed=int(sys.argv[4]), progress=False).run()
else:
    from replay.fork import ForkSession
    ForkSession(sys.argv[3], int(sys.argv[4]), progress=False).fork(out, sys.argv[5])
"""


def _kill_at_first_checkpoint(tmp_path, *args):
    script = tmp_path / "killed_child.py"
    script.write_text(KILLED_BEFORE_CHECKPOINT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def test_really_killed_before_the_first_checkpoint_then_resumed(references, tmp_path):
    parent, child = references
    out = tmp_path / "killed"
    _kill_at_first_checkpoint(tmp_path, "record", out, TINY, SEED)
    with RunDir.open(out) as run:
        assert run.ledger.checkpoints() == {} and not run.is_complete
    assert "step 0" in resume(out)
    assert ledger(out) == ledger(parent)

    local_parent = tmp_path / "parent"
    shutil.copytree(parent, local_parent)
    killed_child = tmp_path / "killed-child"
    _kill_at_first_checkpoint(tmp_path, "fork", killed_child, local_parent, AT, PERTURB)
    with RunDir.open(killed_child) as run:
        assert run.ledger.checkpoints() == {} and not run.is_complete
    assert f"fork step {AT}" in resume(killed_child)
    assert ledger(killed_child) == ledger(child)


def test_the_command_line_says_what_resume_did(references, tmp_path, capsys):
    from replay.cli import main as cli

    parent, _ = references
    out = copy_of(parent, tmp_path, "cli")
    stop_after(out, 24, 20)
    shutil.rmtree(out / "checkpoints" / "step-00000020")
    assert cli(["resume", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint 20 is not usable" in err and "resuming from checkpoint 10" in err
    assert ledger(out) == ledger(parent)
