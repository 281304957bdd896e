"""Experiments on Ray (replay.experiment.ray_backend): `replay experiment SPEC --ray` on a local
Ray instance with 2 CPUs writes results.json and evaluation files equal, byte for byte, to
`--workers 1`'s, also when a task's worker is killed with SIGKILL in the middle of a recording
(Ray retries it; the retry deletes the half-written run and records it again). Without Ray,
`--ray` is a one-line error that says how to install it, and nothing is written. A task that
wrote where the driver cannot read, or ran in another environment, is refused.

Ray's start-up costs seconds, so the Ray run is one test. Without Ray installed it is skipped,
unless REPLAY_REQUIRE_RAY=1 (CI, .ci/run): then it fails."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from replay.cli import main as cli
from replay.environment import environment
from replay.experiment import ExperimentError
from replay.experiment.ray_backend import INSTALL, check_environment, check_evaluations

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "programs" / "tiny.py"

# tests/programs/tiny.py, whose step kills its own process (SIGKILL, as the OOM killer or a lost
# node would) at step 8 of the first recording that gets there, once: the marker file says so.
KILLER = """
import dataclasses as _dataclasses, os as _os, signal as _signal
from pathlib import Path as _Path

_MARKER = _Path({marker!r})
_step = step


def _killing_step(ctx):
    if ctx.step == 8 and not _MARKER.exists():
        _MARKER.write_text(str(_os.getpid()))
        _os.kill(_os.getpid(), _signal.SIGKILL)
    return _step(ctx)


program = _dataclasses.replace(program, step=_killing_step)
"""

SPEC = """
name = "ray"
program = "killer.py:program"
seeds = [1, 2, 3]
fork_steps = [10]
steps = 16
horizons = [0, 3]
distances = ["tv", "param_l2"]
bootstrap_resamples = 100
probe = { source = "replay.demo:probe" }
arms = [ { name = "placebo", perturb = ["placebo"] }, { name = "m_reset", perturb = ["reset_exp_avg"] },
         { name = "bitflip", perturb = ["bitflip"], reference = true } ]
"""


def require_ray():
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("REPLAY_REQUIRE_RAY") == "1":
            pytest.fail(f"REPLAY_REQUIRE_RAY=1 and Ray is not installed ({INSTALL}, or make install)")
        pytest.skip(f"Ray is not installed ({INSTALL})")


def without_duration(path: Path) -> dict:
    results = json.loads(path.read_text(), parse_constant=float)
    results["experiment"].pop("duration_s")  # wall time: the one field that may differ
    return results


def test_ray_equals_one_worker_bit_for_bit_with_a_killed_task_retried(tmp_path, capsys):
    require_ray()
    marker = tmp_path / "killed-once"
    (tmp_path / "killer.py").write_text(TINY.read_text() + KILLER.format(marker=str(marker)))
    (tmp_path / "spec.toml").write_text(SPEC)
    spec = str(tmp_path / "spec.toml")
    assert cli(["experiment", spec, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2", "--no-progress"]) == 0
    # A task was killed at step 8 of a recording (in a Ray worker, not in this process) and
    # retried: every run is complete.
    assert marker.exists() and int(marker.read_text()) != os.getpid()
    assert cli(["experiment", spec, "--out", str(tmp_path / "one"), "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    ray_results, one_results = without_duration(tmp_path / "ray" / "results.json"), \
        without_duration(tmp_path / "one" / "results.json")
    assert ray_results["placebo"]["exact_zero"] and len(ray_results["estimates"]) > 0
    assert json.dumps(ray_results, sort_keys=True) == json.dumps(one_results, sort_keys=True)
    ray_evals = {p.name: p.read_bytes() for p in (tmp_path / "ray" / "evals").iterdir()}
    one_evals = {p.name: p.read_bytes() for p in (tmp_path / "one" / "evals").iterdir()}
    assert len(ray_evals) == 2 * 3 * 4 and ray_evals == one_evals  # 3 seeds x (parent + 3 arms)


def test_ray_not_installed_is_a_one_line_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    (tmp_path / "killer.py").write_text(TINY.read_text())
    (tmp_path / "spec.toml").write_text(SPEC)
    assert cli(["experiment", str(tmp_path / "spec.toml"), "--out", str(tmp_path / "exp"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "replay[ray]"' in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "exp" / "spec.json").exists()


def test_a_task_the_driver_cannot_read_or_from_another_environment_is_refused(tmp_path):
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "main__seed-1.json").write_text(json.dumps({"sha256": "ab" * 32}))
    check_evaluations(tmp_path, {"evals/main__seed-1.json": "ab" * 32}, "node-a")
    with pytest.raises(ExperimentError, match="reads another version.*shares"):
        check_evaluations(tmp_path, {"evals/main__seed-1.json": "cd" * 32}, "node-a")
    with pytest.raises(ExperimentError, match="node-b.*cannot read it.*shares"):
        check_evaluations(tmp_path, {"evals/main__seed-2.json": "ab" * 32}, "node-b")
    here = environment()
    check_environment(here, dict(here, hostname="b", python="3.99.0"), "b")  # informational keys only
    with pytest.raises(ExperimentError, match=f"node c.*torch: '{re.escape(here['torch'])}' here, '9.9.9' there"):
        check_environment(here, dict(here, torch="9.9.9"), "c")
    with pytest.raises(ExperimentError, match="node d.*threads"):
        check_environment(here, dict(here, threads=here["threads"] + 1), "d")


ALWAYS_KILLED = """
import dataclasses as _dataclasses, os as _os, signal as _signal

_step = step


def _killing_step(ctx):
    if ctx.step == 3:
        _os.kill(_os.getpid(), _signal.SIGKILL)
    return _step(ctx)


program = _dataclasses.replace(program, step=_killing_step)
"""


def test_a_task_whose_every_attempt_dies_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """Retries exhausted (none allowed here, to keep the test short): the CLI says which task died
    and how to resume, in one line, instead of Ray's traceback."""
    require_ray()
    from replay.experiment import ray_backend

    monkeypatch.setattr(ray_backend, "MAX_RETRIES", 0)
    (tmp_path / "killer.py").write_text(TINY.read_text() + ALWAYS_KILLED)
    (tmp_path / "spec.toml").write_text(SPEC.replace("seeds = [1, 2, 3]", "seeds = [1, 2]"))
    status = cli(["experiment", str(tmp_path / "spec.toml"), "--out", str(tmp_path / "exp"), "--ray", "--workers", "1",
                  "--no-progress"])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("replay:")]
    assert len(lines) == 1 and "died 1 times" in lines[0] and "seed " in lines[0], err
