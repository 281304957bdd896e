"""The `replay` command's error contract (issue 9, items 7 and 8).

- bad input: exit 2, one line on stderr, ``replay: error: ...``, no traceback;
- an error in the user's program (on import, a SyntaxError, in a factory or the step): exit 1,
  the program's own frames (none of replay's) and a one-line summary;
- Ctrl-C: exit 130, and `replay resume` completes the run bit for bit;
- disk full (ENOSPC, EFBIG) during a checkpoint write: exit 1, one line saying so, and the run
  resumes bit for bit;
- validation holes: check --at outside the run, --steps <= 0, weight_noise std < 0, a window
  longer than the child, an experiment without arms or with a scalar seed, tree on a missing
  folder, tree over a damaged run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replay.cli import bad_input_types, main
from replay.store import RunDir

from conftest import ROOT, write_program


def run_main(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, status=2, contains=()):
    assert rc == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("replay: error: "), err
    assert "Traceback" not in err
    for text in contains:
        assert text in lines[0], err


def ledger_of(run_dir):
    with RunDir.open(run_dir) as run:
        return [r.digest for r in run.ledger.rows()], run.ledger.checkpoints(), run.is_complete


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A complete 20-step run of the base program (checkpoints every 5), and the program."""
    folder = tmp_path_factory.mktemp("recorded")
    program = write_program(folder / "base.py")
    run = folder / "run"
    assert main(["record", f"{program}:program", "--out", str(run), "--no-progress"]) == 0
    return program, run


# ----------------------------------------------------------------------- bad input: 2 ----


def test_bad_input_types_are_listed_in_one_place():
    from replay._numerics import NumericsUnavailable
    from replay.experiment.spec import ExperimentError
    from replay.fork import ForkError
    from replay.outputs import OutputRefused
    from replay.perturb import PerturbationRefused
    from replay.store import CorruptRunError, RunError

    for kind in (ValueError, RunError, CorruptRunError, ForkError, PerturbationRefused, ExperimentError,
                 NumericsUnavailable, FileNotFoundError, OutputRefused):
        assert issubclass(kind, bad_input_types()), kind


def test_experiment_errors_are_one_line(tmp_path, capsys, recorded):
    program, _ = recorded
    spec = tmp_path / "spec.toml"
    base = (f'name = "x"\nprogram = "{program}:program"\nfork_steps = [5]\nhorizons = [0, 2]\n'
            f'probe = {{ source = "{program}:probe" }}\n')
    cases = {
        "no arms": (base + "seeds = [1, 2]\narms = []\n", "at least one arm"),
        "scalar seeds": (base + 'seeds = 1000000000\n[[arms]]\nname = "a"\nperturb = ["placebo"]\n', "seeds"),
        "unknown key": (base + 'seeds = [1, 2]\nbogus = 1\n[[arms]]\nname = "a"\nperturb = ["placebo"]\n', "bogus"),
        "unknown arm key": (base + 'seeds = [1, 2]\n[[arms]]\nname = "a"\nperturb = ["placebo"]\nwho = 1\n', "who"),
        "bad TOML": ("name = \n", "spec.toml"),
    }
    for name, (text, needle) in cases.items():
        spec.write_text(text)
        rc, _, err = run_main(capsys, "experiment", spec, "--out", tmp_path / "exp", "--no-progress")
        assert_one_line_error(rc, err, contains=(needle,))
        assert not (tmp_path / "exp" / "runs").exists(), name


def test_experiment_spec_that_is_a_folder_or_missing(tmp_path, capsys):
    rc, _, err = run_main(capsys, "experiment", tmp_path, "--out", tmp_path / "exp")
    assert_one_line_error(rc, err, contains=("not a file",))
    rc, _, err = run_main(capsys, "experiment", tmp_path / "nope.toml", "--out", tmp_path / "exp")
    assert_one_line_error(rc, err)


def test_experiment_error_from_the_runner_is_one_line(tmp_path, capsys):
    """An experiment folder holding another spec: the runner's ExperimentError, one line."""
    out = tmp_path / "exp"
    (out / "evals").mkdir(parents=True)
    (out / "spec.json").write_text('{"name": "another experiment"}')
    spec = ROOT / "examples" / "validation" / "chaos.toml"
    rc, _, err = run_main(capsys, "experiment", spec, "--out", out, "--no-progress")
    assert_one_line_error(rc, err, contains=("different spec",))
    assert (out / "spec.json").read_text() == '{"name": "another experiment"}'


def test_numerics_unavailable_inside_the_users_step_is_bad_input(tmp_path, capsys, monkeypatch):
    """Raised by replay's optimizer while the user's step calls it: still one line, exit 2."""
    from replay import _numerics

    program = write_program(tmp_path / "torchnum.py", optimizer="replay.optim.SGD(m.parameters(), lr=0.1, numerics='torch')")
    monkeypatch.setattr(_numerics.platform, "machine", lambda: "aarch64")
    rc, _, err = run_main(capsys, "record", f"{program}:program", "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(rc, err, contains=("numerics='torch'", "aarch64"))


@pytest.mark.parametrize("argv, needle", [
    (["check", "{run}", "--at", "-5"], "--at -5"),
    (["check", "{run}", "--at", "500"], "--at 500"),
    (["check", "{run}", "--at", "5", "--steps", "-1"], "--steps -1"),
    (["check", "{run}", "--at", "5", "--steps", "0"], "--steps 0"),
    (["check", "{run}", "--workers", "0"], "--workers 0"),
    (["fork", "{run}", "--at", "5", "--perturb", "weight_noise:std=-1", "--out", "{tmp}/c"], "std"),
    (["fork", "{run}", "--at", "5", "--perturb", "weight_noise:std=nan", "--out", "{tmp}/c"], "std"),
    (["fork", "{run}", "--at", "5", "--perturb", "placebo", "--window", str(10**12), "--out", "{tmp}/c"], "--window"),
    (["fork", "{run}", "--at", "5", "--perturb", "placebo", "--window", "16", "--out", "{tmp}/c"], "--window 16"),
    (["fork", "{run}", "--at", "5", "--perturb", "placebo", "--window", "0", "--out", "{tmp}/c"], "--window 0"),
    (["fork", "{run}", "--at", "-1", "--perturb", "placebo", "--out", "{tmp}/c"], "step -1"),
    (["fork", "{run}", "--at", "5", "--perturb", "placebo", "--until", "3", "--out", "{tmp}/c"], "--until 3"),
    (["fork", "{run}", "--at", "5", "--perturb", "nosuch", "--out", "{tmp}/c"], "nosuch"),
    (["record", "{program}:program", "--steps", "-1", "--out", "{tmp}/r"], "--steps -1"),
    (["record", "{tmp}/missing.py:program", "--out", "{tmp}/r"], "missing.py"),
    (["inspect", "{tmp}/nothing"], "nothing"),
    (["tree", "/nonexistent/replay-tree"], "/nonexistent/replay-tree"),
])
def test_validation_holes_are_refused_in_one_line(tmp_path, capsys, recorded, argv, needle):
    program, run = recorded
    before = ledger_of(run)
    argv = [a.format(run=run, tmp=tmp_path, program=program) for a in argv]
    rc, out, err = run_main(capsys, *argv)
    assert_one_line_error(rc, err, contains=(needle,))
    assert "DIVERGES" not in out
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()
    assert ledger_of(run) == before


def test_check_at_a_recorded_step_still_runs(capsys, recorded):
    _, run = recorded
    rc, out, err = run_main(capsys, "check", run, "--at", "7", "--steps", "3")
    assert rc == 0, err
    assert "placebo fork at step 7: identical" in out


def test_tree_flags_a_damaged_run_and_shows_the_rest(tmp_path, capsys, recorded):
    import shutil

    _, run = recorded
    shutil.copytree(run, tmp_path / "a-good")
    shutil.copytree(run, tmp_path / "b-keyless")
    manifest = json.loads((tmp_path / "b-keyless" / "manifest.json").read_text())
    del manifest["steps"]
    (tmp_path / "b-keyless" / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(run, tmp_path / "c-garbage")
    (tmp_path / "c-garbage" / "manifest.json").write_text("{not json")
    shutil.copytree(run, tmp_path / "d-good")
    rc, out, err = run_main(capsys, "tree", tmp_path)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["a-good", "b-keyless", "c-garbage", "d-good"]
    assert "UNREADABLE" not in lines[0] and "UNREADABLE" not in lines[3]
    assert "UNREADABLE" in lines[1] and "manifest" in lines[1]  # lacks 'steps' (or, hashed, was edited)
    assert "UNREADABLE" in lines[2] and "manifest.json" in lines[2]  # not valid JSON (or, hashed, edited)


def test_tree_of_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, _, err = run_main(capsys, "tree", tmp_path / "f")
    assert_one_line_error(rc, err, contains=("not a folder",))


# ------------------------------------------------------------ the user's program: 1 ----


USER_ERRORS = {
    # name: (what to change in the base program, the summary, the user's line that must show)
    "import": ({"prelude": "raise RuntimeError('import boom')"}, "RuntimeError: import boom", "import boom"),
    "syntax": ({"epilogue": "def broken(:"}, "SyntaxError", "def broken(:"),
    "factory": ({"model_body": "raise KeyError('factory boom')"}, "KeyError: 'factory boom'", "factory boom"),
    "step": ({"step_prelude": "if ctx.step == 7:\n        raise ValueError('step boom')"},
             "ValueError: step boom", "step boom"),
    "torch": ({"step_prelude": "if ctx.step == 3:\n        torch.zeros(2) @ torch.zeros(3)"}, "RuntimeError", "@"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_an_error_in_the_users_program_shows_its_frames_and_one_summary(tmp_path, capsys, case):
    change, summary, shown = USER_ERRORS[case]
    program = write_program(tmp_path / f"user_{case}.py", **change)
    rc, _, err = run_main(capsys, "record", f"{program}:program", "--out", tmp_path / "run", "--no-progress")
    assert rc == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"replay: error in the program ({program}, line "), err
    assert summary in last, err
    assert shown in err
    assert str(program) in err
    replay_dir = str(ROOT / "replay")
    assert replay_dir not in err, err  # none of replay's own frames


def test_a_user_error_in_a_subprocess_exits_1(tmp_path):
    program = write_program(tmp_path / "user.py", step_prelude="if ctx.step == 2:\n        raise ValueError('sub boom')")
    proc = subprocess.run([sys.executable, "-m", "replay.cli", "record", f"{program}:program", "--out",
                           str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("replay: error in the program")
    assert "replay/session.py" not in proc.stderr and "replay/cli.py" not in proc.stderr


def test_memory_error_is_one_line(tmp_path, capsys):
    program = write_program(tmp_path / "oom.py", step_prelude="if ctx.step == 4:\n        raise MemoryError()")
    rc, _, err = run_main(capsys, "record", f"{program}:program", "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(rc, err, status=1, contains=("out of memory",))


# --------------------------------------------------------------- disk full, Ctrl-C ----


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_disk_full_in_a_checkpoint_write_says_so_and_the_run_resumes_bit_for_bit(tmp_path, capsys, monkeypatch,
                                                                                 recorded, code):
    from replay.store import checkpoint as checkpoint_module
    from replay.store import run as run_module

    program, reference = recorded
    real = checkpoint_module.write_checkpoint
    calls = []

    def failing(folder, step, state):
        calls.append(step)
        if step == 10:
            raise OSError(code, os.strerror(code))
        return real(folder, step, state)

    for module in (checkpoint_module, run_module):  # whichever the recording calls
        monkeypatch.setattr(module, "write_checkpoint", failing)
    out = tmp_path / "run"
    rc, _, err = run_main(capsys, "record", f"{program}:program", "--out", out, "--no-progress")
    assert_one_line_error(rc, err, status=1, contains=("disk is full", os.strerror(code), "replay resume"))
    assert 10 in calls
    digests, _, complete = ledger_of(out)
    assert not complete
    for module in (checkpoint_module, run_module):
        monkeypatch.setattr(module, "write_checkpoint", real)
    rc, _, err = run_main(capsys, "resume", out, "--no-progress")
    assert rc == 0, err
    assert ledger_of(out) == ledger_of(reference)


def test_ctrl_c_exits_130_and_the_run_resumes_bit_for_bit(tmp_path, recorded):
    """SIGINT at a moment synchronised on the program's own ready signal (a file it writes in
    step 12 of 40, then waits up to 60 s in that step, so that a slow test process cannot miss
    it on a loaded machine): the recording stops with 130 before it is complete, and `replay
    resume` completes it with the uninterrupted recording's ledger and checkpoints."""
    program = write_program(tmp_path / "slow.py", steps=40,
                            step_prelude="time.sleep(0.03)\n    if ctx.step == 12 and os.environ.get('READY_FILE'):\n"
                                         "        open(os.environ['READY_FILE'], 'w').close()\n"
                                         "        time.sleep(60)")
    ready = tmp_path / "ready"
    out = tmp_path / "run"
    env = dict(os.environ, READY_FILE=str(ready), PYTHONPATH=str(ROOT))
    # SIGINT at its default in the child: a test run started in the background (`cmd &` in a
    # script, nohup) has it ignored, which every child would inherit (Ctrl-C could not reach them).
    proc = subprocess.Popen([sys.executable, "-m", "replay.cli", "record", f"{program}:program", "--out", str(out),
                             "--no-progress"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [f"replay: interrupted; `replay resume {out}` continues the recording"]
    digests, _, complete = ledger_of(out)
    assert not complete and len(digests) < 40  # stopped mid-run, not after it
    done = subprocess.run([sys.executable, "-m", "replay.cli", "resume", str(out), "--no-progress"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reference = tmp_path / "reference"
    assert main(["record", f"{program}:program", "--out", str(reference), "--no-progress"]) == 0
    assert ledger_of(out) == ledger_of(reference)


def test_an_error_in_the_users_program_in_a_worker_process_shows_its_frames(tmp_path, capsys, monkeypatch):
    """`check --workers 2` replays in spawned processes: the program's frames come back as text
    and are shown the same way, exit 1."""
    program = write_program(tmp_path / "worker.py",
                            step_prelude="if os.environ.get('REPLAY_TEST_RAISE') and ctx.step == 12:\n"
                                         "        raise RuntimeError('worker boom')")
    run = tmp_path / "run"
    assert main(["record", f"{program}:program", "--out", str(run), "--no-progress"]) == 0
    monkeypatch.setenv("REPLAY_TEST_RAISE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    rc, _, err = run_main(capsys, "check", run, "--at", "5", "10", "--workers", "2")
    assert rc == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"replay: error in the program ({program}, line "), err
    assert "RuntimeError: worker boom" in last and "raise RuntimeError('worker boom')" in err
    assert str(ROOT / "replay") not in err


def test_lifetimes_table_separates_its_columns(capsys):
    """A half-life marked "extrapolated" that fills its column is still followed by a space
    (it printed "extrapolatedinf" once)."""
    from replay.cli import print_estimates

    lifetime = {"program": "p", "arm": "reset_exp_avg", "fork_step": 10, "model": "exponential", "plateau": 0.01,
                "plateau_interval": [0.0, 0.02], "plateau_ratio": 1.5, "half_life": 123456.7,
                "interval": [1234.5, float("inf")], "extrapolated": True,
                "state": {"half_life": float("inf"), "interval": [5.0, float("inf")], "extrapolated": False}}
    results = {"experiment": {"name": "e", "primary_distance": "tv", "primary_horizon": 5, "probe": {"size": 8},
                              "seeds": [1, 2], "equivalence_margin": 1.0},
               "estimates": [], "placebo": {"exact_zero": True}, "lifetimes": [lifetime], "references": []}
    print_estimates(results)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("p "))
    assert "extrapolated inf" in row and "extrapolatedinf" not in row


def test_a_reader_that_goes_away_ends_the_output_quietly(recorded):
    """`replay inspect RUN | head -1`: the reader is gone when replay writes (here before it
    starts, so that the write fails whatever the timing: with a reader that left after one line,
    output that fits in the pipe's buffer may be written before it leaves); replay stops with
    status 141 (128 + SIGPIPE) and no traceback."""
    _, run = recorded
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: every write to the pipe fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "replay.cli", "inspect", str(run)], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
