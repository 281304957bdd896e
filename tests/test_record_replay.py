"""Record then replay, rr-style: every example records and verifies bit for bit; resumed runs
equal uninterrupted ones; divergences, changed sources and environments, corruption, pickles and
second writers are caught with clear errors."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replay.cli import main as cli
from replay.session import RecordSession, ReplayRefused, ReplaySession
from replay.store import CorruptRunError, RunDir, RunLockedError

from killing import kill_when_ready

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TINY = str(HERE / "programs" / "tiny.py") + ":program"


def ledger_rows(path):
    with RunDir.open(path) as run:
        return run.ledger.rows()


def record(tmp_path, name="run", reference=TINY, **kw):
    out = tmp_path / name
    RecordSession(reference, out, progress=False, **kw).run()
    return out


# ------------------------------------------------------------------- record, verify ----


@pytest.mark.parametrize("example,steps", [("digits_mlp.py", 24), ("digits_cnn.py", 16), ("contrastive.py", 16)])
def test_every_example_records_and_verifies(tmp_path, example, steps):
    out = tmp_path / "run"
    ref = str(ROOT / "examples" / example) + ":program"
    assert cli(["record", ref, "--seed", "3", "--steps", str(steps), "--out", str(out),
                "--checkpoint-every", "8", "--no-progress"]) == 0
    assert cli(["verify", str(out), "--no-progress"]) == 0
    assert cli(["verify", str(out), "--from", "9", "--to", "13", "--no-progress"]) == 0
    rows = ledger_rows(out)
    assert [r.step for r in rows] == list(range(steps))
    assert all(r.loss is not None and r.fingerprints["model"] for r in rows)


def test_record_is_deterministic_and_seeds_matter(tmp_path):
    a = ledger_rows(record(tmp_path, "a", seed=1))
    b = ledger_rows(record(tmp_path, "b", seed=1))
    c = ledger_rows(record(tmp_path, "c", seed=2))
    assert [r.digest for r in a] == [r.digest for r in b]
    assert [r.batch_ids for r in a] == [r.batch_ids for r in b]
    assert a[0].digest != c[0].digest and a[0].batch_ids != c[0].batch_ids


def test_ledger_describes_every_component(tmp_path):
    rows = ledger_rows(record(tmp_path))
    fps = rows[-1].fingerprints
    assert {"model", "optimizer", "scheduler", "ema"} <= set(fps)
    assert "1.running_mean" in fps["model"] and "1.num_batches_tracked" in fps["model"]
    assert any(name.endswith(".exp_avg_sq") for name in fps["optimizer"])
    assert "0.weight" in fps["ema"]
    assert rows[-1].lr == pytest.approx(5e-3 * 0.25)


def test_verify_names_the_divergent_step_and_tensors(tmp_path):
    program_file = tmp_path / "tiny.py"
    shutil.copy(HERE / "programs" / "tiny.py", program_file)
    out = record(tmp_path, reference=f"{program_file}:program")
    # (A changed learning rate would not show: checkpoints carry the optimizer's param groups.)
    source = program_file.read_text()
    assert "loss = F.cross_entropy(" in source
    program_file.write_text(source.replace("loss = F.cross_entropy(", "loss = 1.5 * F.cross_entropy("))
    with pytest.raises(ReplayRefused, match="source"):
        ReplaySession(out).verify(progress=False)
    report = ReplaySession(out, allow_source_change=True).verify(progress=False)
    assert not report.ok
    assert report.divergence.step == 0
    assert "0.weight" in report.divergence.components["model"]
    assert not report.divergence.batch
    with RunDir.open(out) as run:
        assert any(e["kind"] == "verify:source_change_allowed" for e in run.ledger.events())


def test_changed_environment_is_refused_unless_allowed(tmp_path):
    out = record(tmp_path)
    with RunDir.open(out, writable=True) as run:  # through the writer: the ledger records the manifest's digest
        environment = run.manifest["environment"]
        run.update_manifest({"environment": {**environment, "threads": environment["threads"] + 7}})
    with pytest.raises(ReplayRefused, match="threads"):
        ReplaySession(out).verify(progress=False)
    assert ReplaySession(out, allow_environment_change=True).verify(progress=False).ok
    with RunDir.open(out) as run:
        assert any(e["kind"] == "verify:environment_change_allowed" for e in run.ledger.events())


# --------------------------------------------------------------------------- resume ----


def test_resume_equals_uninterrupted(tmp_path):
    full = record(tmp_path, "full", seed=5)
    partial = tmp_path / "partial"
    RecordSession(TINY, partial, seed=5, progress=False).run()
    # Pretend the recording stopped after checkpoint 10: drop what came after it.
    with RunDir.open(partial, writable=True) as run:
        run.ledger.truncate_after(9, keep_checkpoint=10)
        run.update_manifest({"status": "incomplete"})
    shutil.rmtree(partial / "checkpoints" / "step-00000020")
    RecordSession.resume(partial, progress=False)
    a, b = ledger_rows(full), ledger_rows(partial)
    assert [(r.step, r.digest, r.batch_hash, r.loss) for r in a] == [(r.step, r.digest, r.batch_hash, r.loss) for r in b]
    with RunDir.open(full) as ra, RunDir.open(partial) as rb:
        sa, sb = ra.load_checkpoint(30), rb.load_checkpoint(30)
    for name, t in sa["model"].items():
        assert torch.equal(t.view(torch.uint8) if t.dtype != torch.int64 else t, sb["model"][name].view(torch.uint8) if t.dtype != torch.int64 else sb["model"][name])


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    """Kill a recording mid-run (synchronised on a ready signal the child prints once it has
    completed step `target`, so no trial can miss the run) at random moments, then resume."""
    import random

    reference_run = record(tmp_path, "reference", seed=9, steps=120, checkpoint_every=7)
    with RunDir.open(reference_run) as run:
        expected_checkpoints = run.ledger.checkpoints()
    expected = [(r.step, r.digest) for r in ledger_rows(reference_run)]
    rng = random.Random(20261201)
    for trial, target in enumerate((1, 7, 30, 64, 100)):
        out = tmp_path / f"killed{trial}"
        # from the target on a step takes >= 3 ms; the kill comes < the 20 slowed steps left after the last target
        kill_when_ready(tmp_path, target, ["record", TINY, "--seed", "9", "--steps", "120", "--checkpoint-every", "7",
                                           "--out", out, "--no-progress"],
                        step_sleep=0.003, after_ready=rng.uniform(0.0, 0.05))
        with RunDir.open(out) as run:
            assert not run.is_complete, f"trial {trial}: the recording finished before the kill"
            recorded = run.ledger.checkpoints()
            last = run.ledger.last_step()
            for step in recorded:  # every recorded checkpoint passes its hash check
                run.load_checkpoint(step)
        assert last is None or last < 119
        RecordSession.resume(out, progress=False, say=lambda message: None)
        assert [(r.step, r.digest) for r in ledger_rows(out)] == expected, f"trial {trial} (target {target})"
        with RunDir.open(out) as run:
            assert run.ledger.checkpoints() == expected_checkpoints


# ----------------------------------------------------------------- corruption, safety ----


def _first_checkpoint_file(out, name):
    return sorted((out / "checkpoints").glob("step-*"))[1] / name


@pytest.mark.parametrize("name", ["tensors.safetensors", "state.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_is_named(tmp_path, name, damage):
    out = record(tmp_path)
    path = _first_checkpoint_file(out, name)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    report = ReplaySession(out).verify(start=12, progress=False)
    assert not report.ok and report.divergence is None
    assert len(report.damaged) == 1 and str(path) in report.damaged[0]


def test_damaged_ledger_is_named(tmp_path):
    out = record(tmp_path)
    path = out / "ledger.sqlite"
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRunError, match="ledger.sqlite"):
        ReplaySession(out).verify(progress=False)


class _Marker:
    """Unpickling this creates a file: proof that something loaded a pickle."""

    path = None

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_in_a_run_is_never_loaded(tmp_path):
    out = record(tmp_path)
    marker = tmp_path / "unpickled"
    _Marker.path = marker
    payload = pickle.dumps({"evil": _Marker()})
    (out / "checkpoints" / "step-00000010" / "state.pkl").write_bytes(payload)
    (out / "extra.pt").write_bytes(payload)
    assert ReplaySession(out).verify(progress=False).ok
    (out / "checkpoints" / "step-00000010" / "tensors.safetensors").write_bytes(payload)
    report = ReplaySession(out).verify(start=12, progress=False)
    assert not report.ok and "tensors.safetensors" in report.damaged[0]
    assert not marker.exists()


def test_second_writer_fails_loudly(tmp_path):
    out = record(tmp_path)
    with RunDir.open(out, writable=True):
        with pytest.raises(RunLockedError):
            RecordSession.resume(out, progress=False)


def test_inspect_and_cli_errors(tmp_path, capsys):
    out = record(tmp_path)
    assert cli(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "epoch order hashes" in text and "cpu_capability" in text
    assert cli(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps_recorded"] == 30 and data["checkpoints"] == [0, 10, 20, 30]
    assert cli(["verify", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert cli(["record", "no_such_module:program", "--out", str(tmp_path / "x"), "--no-progress"]) == 2


def test_import_replay_loads_neither_torch_nor_the_extension():
    """`import replay` and replay.estimands start fast: torch and replay._C load on first use."""
    code = ("import sys, replay, replay.estimands\n"
            "assert not {'torch', 'replay._C', 'torch._dynamo'} & set(sys.modules), sorted(sys.modules)\n"
            "import replay._ops\n"
            "assert 'replay._C' not in sys.modules\n"
            "replay.fingerprint\n"
            "assert 'replay._C' not in sys.modules\n"
            "import torch\n"
            "replay.fingerprint(torch.zeros(3))\n"
            "assert 'replay._C' in sys.modules\n"
            "assert replay.Program is replay.program.Program and replay.optim.AdamW\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_help_inspect_and_tree_do_not_import_torch(tmp_path):
    """`replay --help`, `inspect` and `tree` read JSON and SQLite only: they start in a fraction of
    torch's import time (about 0.06 s against 1.2 s on the development machine)."""
    out = record(tmp_path, steps=6)
    code = ("import sys, contextlib, io\nfrom replay.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            f"    assert main(['inspect', {str(out)!r}]) == 0\n"
            f"    assert main(['tree', {str(tmp_path)!r}]) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_inspect_tree_diff_and_verify_files_load_no_extension(tmp_path):
    """The read-only commands never need the compiled kernels: replay._C is not loaded."""
    out = record(tmp_path, steps=12)
    code = ("import sys\nfrom replay.cli import main\n"
            f"for argv in (['inspect', {str(out)!r}], ['tree', {str(tmp_path)!r}], ['diff', {str(out)!r}, {str(out)!r}],"
            f" ['verify', {str(out)!r}, '--files']):\n"
            "    assert main(argv) == 0, argv\n"
            "assert not {'replay._C', 'torch._dynamo'} & set(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                   stdout=subprocess.DEVNULL)
