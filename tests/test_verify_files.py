"""`replay verify` checks every file the ledger records (hash, then parse) and compares every
stored checkpoint with the replayed state; `replay verify --files` checks integrity alone. Each
kind of damage, to any checkpoint, is reported, never "OK"."""

import shutil
from pathlib import Path

import pytest
import torch

from replay.cli import main as cli
from replay.session import RecordSession, ReplaySession, verify_files
from replay.store import CorruptRunError, RunDir

HERE = Path(__file__).resolve().parent
TINY = str(HERE / "programs" / "tiny.py") + ":program"
CHECKPOINTS = [0, 10, 20, 30]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "run"
    RecordSession(TINY, out, seed=4, progress=False).run()
    with RunDir.open(out) as run:
        assert run.checkpoint_steps() == CHECKPOINTS
    return out


@pytest.fixture
def run(recorded, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(recorded, out)
    return out


def folder(run, step):
    return run / "checkpoints" / f"step-{step:08d}"


def flip(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def empty_checkpoint(run, step):
    for f in folder(run, step).iterdir():
        f.write_bytes(b"")


DAMAGE = {
    "flip_tensors": lambda run, step: flip(folder(run, step) / "tensors.safetensors"),
    "flip_tensors_header": lambda run, step: flip(folder(run, step) / "tensors.safetensors", 0.0),
    "flip_state": lambda run, step: flip(folder(run, step) / "state.json"),
    "truncate_tensors": lambda run, step: (folder(run, step) / "tensors.safetensors").write_bytes(
        (folder(run, step) / "tensors.safetensors").read_bytes()[:100]),
    "delete_state": lambda run, step: (folder(run, step) / "state.json").unlink(),
    "empty": empty_checkpoint,
    "delete_folder": lambda run, step: shutil.rmtree(folder(run, step)),
    "replace_by_another": lambda run, step: (shutil.rmtree(folder(run, step)),
                                             shutil.copytree(folder(run, 10 if step != 10 else 20), folder(run, step))),
}


def test_an_intact_run_verifies(run, capsys):
    assert verify_files(run) == []
    assert cli(["verify", str(run), "--files"]) == 0
    assert "OK" in capsys.readouterr().out
    report = ReplaySession(run).verify(progress=False)
    assert report.ok, report.describe()
    assert report.restored_from is None  # from the program itself: checkpoint 0 is compared too
    assert report.checkpoints_compared == CHECKPOINTS
    assert cli(["verify", str(run), "--no-progress"]) == 0


@pytest.mark.parametrize("step", CHECKPOINTS)
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_to_any_checkpoint_is_reported(run, damage, step, capsys):
    DAMAGE[damage](run, step)
    problems = verify_files(run)
    assert len(problems) == 1 and f"step-{step:08d}" in problems[0], problems
    assert cli(["verify", str(run), "--files"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and f"step-{step:08d}" in out and "OK" not in out
    # the full verify reports it too, whichever stretch is replayed
    for start, end in ((None, None), (25, 28)):
        report = ReplaySession(run).verify(start, end, progress=False)
        assert not report.ok and f"step-{step:08d}" in report.describe()
    assert cli(["verify", str(run), "--no-progress"]) == 1
    assert "OK" not in capsys.readouterr().out


def test_damage_to_several_checkpoints_is_all_reported(run):
    DAMAGE["flip_tensors"](run, 10)
    DAMAGE["delete_folder"](run, 30)
    problems = verify_files(run)
    assert len(problems) == 2
    assert "step-00000010" in problems[0] and "step-00000030" in problems[1]


def test_damaged_ledger_is_reported_by_files_check(run, capsys):
    path = run / "ledger.sqlite"
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)
    path.write_bytes(bytes(data))
    assert cli(["verify", str(run), "--files"]) == 2  # the ledger does not even open
    assert "ledger.sqlite" in capsys.readouterr().err


def _rewrite_checkpoint(run, step, change):
    """Tamper consistently: new files, and their hashes recorded in the ledger."""
    with RunDir.open(run, writable=True) as r:
        state = r.load_checkpoint(step)
        change(state)
        r.save_checkpoint(step, state)


@pytest.mark.parametrize("step", CHECKPOINTS)
def test_a_consistently_rewritten_checkpoint_differs_from_the_replay(run, step):
    def change(state):
        weight = state["model"]["0.weight"]
        weight.view(torch.int32)[0, 0] ^= 1  # one bit of one weight

    _rewrite_checkpoint(run, step, change)
    assert verify_files(run) == []  # the hashes agree: only the replay can tell
    report = ReplaySession(run).verify(progress=False)
    assert not report.ok
    if step == 0:
        assert report.checkpoint_mismatches == {0: {"model": ["0.weight"]}}
    else:
        assert report.checkpoint_mismatches == {step: {"model": ["0.weight"]}}
    assert f"stored checkpoint {step} differs" in report.describe()


def test_a_rewritten_optimizer_moment_is_caught(run):
    def change(state):
        moments = [s for s in state["optimizer"]["state"].values() if "exp_avg" in s]
        moments[0]["exp_avg"].view(torch.int32).view(-1)[0] ^= 1

    _rewrite_checkpoint(run, 20, change)
    report = ReplaySession(run).verify(progress=False)
    assert list(report.checkpoint_mismatches) == [20]
    assert list(report.checkpoint_mismatches[20]) == ["optimizer"]


def test_files_check_executes_no_program(tmp_path):
    program = tmp_path / "marked.py"
    marker = tmp_path / "executed"
    source = (HERE / "programs" / "tiny.py").read_text()
    program.write_text(f"open({str(marker)!r}, 'a').close()\n" + source)
    out = tmp_path / "run"
    RecordSession(f"{program}:program", out, steps=12, progress=False).run()
    marker.unlink()
    assert verify_files(out) == []
    assert cli(["verify", str(out), "--files"]) == 0
    assert not marker.exists()


@pytest.mark.parametrize("completed", [10**30, "20", 1e308, 19])
def test_a_checkpoint_naming_another_step_is_refused_not_replayed_past(run, completed, capsys):
    def change(state):
        state["completed_steps"] = completed

    _rewrite_checkpoint(run, 20, change)
    # Caught by whichever layer comes first: the store's validation of the checkpoint (damage),
    # the restore (refused, naming the folder) or the comparison with the replayed state.
    for start in (None, 20, 25):
        try:
            report = ReplaySession(run).verify(start, progress=False)
        except CorruptRunError as error:
            assert start is not None
            text = str(error)
        else:
            assert not report.ok
            text = report.describe()
        assert "completed_steps" in text and ("step-00000020" in text or "checkpoint 20 " in text), text
        assert cli(["verify", str(run), "--from", str(start or 0), "--no-progress"]) in (1, 2)
        assert "OK" not in capsys.readouterr().out
