"""Nothing inside a run is followed through a symbolic link: a linked checkpoint folder,
checkpoint file, ``checkpoints/``, ledger (or its -wal/-shm), manifest or lock file is refused
in one line, for reading and for writing, and nothing is written outside the run."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from replay.store import RunDir, StepRow, write_checkpoint
from replay.store.paths import SymlinkError, inside, read_nofollow
from test_schema import M


def state(step: int) -> dict:
    return {"format": 1, "completed_steps": step, "model": {"w": torch.full((3,), float(step))},
            "optimizer": {}, "scheduler": None, "ema": None, "components": {}}


@pytest.fixture
def run(tmp_path):
    """A run with rows 0..9 and checkpoints 0, 5, 10; and an 'outside' folder holding a copy of
    everything (what a link would point at)."""
    path = tmp_path / "run"
    with RunDir.create(path, M()) as r:
        for s in range(10):
            r.ledger.append_step(StepRow(s, 0, [s], "h", None, None, {}, {"m": {"w": s}}, s))
        for s in (0, 5, 10):
            r.save_checkpoint(s, state(s))
    outside = tmp_path / "outside"
    shutil.copytree(path, outside)
    return path, outside


def snapshot(folder) -> dict:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    out[os.path.relpath(p, folder)] = f.read()
    return out


def link(target, where) -> None:
    """Replace ``where`` by a symlink to ``target``."""
    if os.path.isdir(where) and not os.path.islink(where):
        shutil.rmtree(where)
    elif os.path.lexists(where):
        os.unlink(where)
    os.symlink(target, where)


def one_line(error) -> str:
    message = str(error)
    assert "\n" not in message and "symbolic link" in message, message
    return message


def test_a_linked_checkpoint_folder_is_refused(run):
    path, outside = run
    before = snapshot(outside)
    link(outside / "checkpoints" / "step-00000005", path / "checkpoints" / "step-00000005")
    with RunDir.open(path) as r:
        with pytest.raises(SymlinkError) as info:
            r.load_checkpoint(5)
        assert "step-00000005" in one_line(info.value)
        assert r.load_checkpoint(10)["completed_steps"] == 10  # the real ones still load
    with RunDir.open(path, writable=True) as r:
        with pytest.raises(SymlinkError):
            r.save_checkpoint(5, state(5))  # never written through the link
        with pytest.raises(SymlinkError):
            r.truncate_after(4)  # never renamed or deleted through the link
    assert snapshot(outside) == before


@pytest.mark.parametrize("name", ["state.json", "tensors.safetensors"])
def test_a_linked_checkpoint_file_is_refused(run, name):
    path, outside = run
    link(outside / "checkpoints" / "step-00000005" / name, path / "checkpoints" / "step-00000005" / name)
    with RunDir.open(path) as r:
        with pytest.raises(SymlinkError) as info:
            r.load_checkpoint(5)
        assert name in one_line(info.value)


def test_a_linked_checkpoints_folder_is_refused_for_reading_and_writing(run):
    path, outside = run
    before = snapshot(outside)
    link(outside / "checkpoints", path / "checkpoints")
    for writable in (False, True):
        with pytest.raises(SymlinkError) as info:
            RunDir.open(path, writable=writable)
        assert "checkpoints" in one_line(info.value)
    assert snapshot(outside) == before


@pytest.fixture
def writer_then_link(run):
    path, outside = run
    r = RunDir.open(path, writable=True)
    yield r, path, outside
    r.close()


def test_a_checkpoints_folder_linked_under_an_open_writer_is_not_written(writer_then_link):
    r, path, outside = writer_then_link
    before = snapshot(outside)
    link(outside / "checkpoints", path / "checkpoints")
    with pytest.raises(SymlinkError):
        r.save_checkpoint(7, state(7))
    with pytest.raises(SymlinkError):
        write_checkpoint(r.checkpoints_dir, 8, state(8))  # the driver's background writer
    with pytest.raises(SymlinkError):
        r.load_checkpoint(5)
    assert snapshot(outside) == before


@pytest.mark.parametrize("name", ["ledger.sqlite", "manifest.json", ".lock", "ledger.sqlite-wal",
                                  "ledger.sqlite-shm"])
def test_a_linked_run_file_is_refused(run, name):
    path, outside = run
    target = outside / name
    if not target.exists():
        target.write_bytes(b"")
    before = snapshot(outside)
    link(target, path / name)
    for writable in (False, True):
        with pytest.raises(SymlinkError) as info:
            RunDir.open(path, writable=writable)
        assert name in one_line(info.value)
    assert snapshot(outside) == before


def test_a_manifest_linked_under_an_open_writer_is_not_read(writer_then_link):
    r, path, outside = writer_then_link
    link(outside / "manifest.json", path / "manifest.json")
    with pytest.raises(SymlinkError):
        r.manifest
    with pytest.raises(SymlinkError):
        r.update_manifest({"note": 1})
    assert b"note" not in (outside / "manifest.json").read_bytes()


def test_the_run_root_itself_may_be_a_link(run, tmp_path):
    path, _ = run
    os.symlink(path, tmp_path / "alias")
    with RunDir.open(tmp_path / "alias") as r:
        assert r.load_checkpoint(5)["completed_steps"] == 5


def test_create_refuses_a_link_in_place_of_the_run(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "run")
    from replay.store import RunExistsError

    with pytest.raises(RunExistsError):
        RunDir.create(tmp_path / "run", M())
    assert os.listdir(tmp_path / "elsewhere") == []


def test_paths_helpers(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "b")
    assert inside(tmp_path, "a", "f") == str(tmp_path / "a" / "f")
    assert inside(tmp_path, "missing/x") == str(tmp_path / "missing" / "x")
    with pytest.raises(SymlinkError):
        inside(tmp_path, "b", "f")
    assert read_nofollow(tmp_path / "a" / "f") == b"x"
    os.symlink(tmp_path / "a" / "f", tmp_path / "g")
    with pytest.raises(SymlinkError):
        read_nofollow(tmp_path / "g")


def test_end_to_end_resume_does_not_write_through_a_linked_checkpoints_folder(tmp_path):
    """The issue's case: a symlinked checkpoints/ made resume write outside the run."""
    from replay.session import RecordSession, ReplaySession

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "r"
    RecordSession(os.path.join(repo, "tests", "programs", "tiny.py") + ":program", out, steps=12,
                  checkpoint_every=5, progress=False).run()
    with RunDir.open(out, writable=True) as r:
        r.update_manifest({"status": "incomplete"})
    outside = tmp_path / "outside"
    shutil.move(out / "checkpoints", outside)
    os.symlink(outside, out / "checkpoints")
    before = snapshot(outside)
    with pytest.raises(SymlinkError) as info:
        RecordSession.resume(out, progress=False, say=lambda m: None)
    one_line(info.value)
    with pytest.raises(SymlinkError):
        ReplaySession(out).verify(progress=False)
    assert snapshot(outside) == before
