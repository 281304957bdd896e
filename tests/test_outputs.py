"""`--out` cannot wreck a run (issue 9, item 5).

Every command that writes (record, fork, experiment, report, demo) checks its output with
replay/outputs.py: nothing is written inside an existing run (the path, or a folder above it,
holds a manifest.json) or inside an experiment's runs/ folder, symlinks included, and no file the
command did not write is overwritten without --force. Each refusal is one line, exit 2, and the
run is left byte for byte as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replay.cli import main
from replay.outputs import OutputRefused, check_experiment_out, check_file_out, check_run_out, owning_run

from conftest import HERE, write_program

sys_path_fixtures = str(HERE / "fixtures")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (links not followed), by relative path, with its bytes."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root) / name
            out[str(path.relative_to(folder))] = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A recorded run, an experiment folder (a run under runs/, synthetic results.json) and its report."""
    import sys

    sys.path.insert(0, sys_path_fixtures)
    import make_results as fx

    base = tmp_path_factory.mktemp("outputs")
    program = write_program(base / "prog.py")
    run = base / "run"
    assert main(["record", f"{program}:program", "--out", str(run), "--no-progress"]) == 0
    exp = base / "exp"
    fx.write(exp, fx.make_results())
    (exp / "spec.json").write_text("{}")
    inner = exp / "runs" / "main" / "seed-1"
    assert main(["record", f"{program}:program", "--out", str(inner), "--no-progress", "--steps", "6"]) == 0
    assert main(["report", str(exp)]) == 0
    return program, run, exp


def refused(capsys, *argv, needle="--out"):
    rc = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("replay: error: ") and needle in err, err


HOSTILE = {
    # name: argv with {run}, {exp}, {program}, {tmp}
    "report over a manifest": ["report", "{exp}", "--out", "{run}/manifest.json"],
    "report inside a checkpoint": ["report", "{exp}", "--out", "{run}/checkpoints/step-00000005/r.html"],
    "report into a run": ["report", "{exp}", "--out", "{run}/report.html"],
    "report of a run, default out": ["report", "{run}"],
    "report into an experiment's runs": ["report", "{exp}", "--out", "{exp}/runs/r.html"],
    "fork into a checkpoint folder": ["fork", "{run}", "--at", "3", "--perturb", "placebo",
                                      "--out", "{run}/checkpoints/step-00000070"],
    "fork onto the run": ["fork", "{run}", "--at", "3", "--perturb", "placebo", "--out", "{run}"],
    "fork below an experiment's runs": ["fork", "{run}", "--at", "3", "--perturb", "placebo",
                                        "--out", "{exp}/runs/main/seed-9"],
    "record inside a run": ["record", "{program}:program", "--out", "{run}/child"],
    "record onto a run": ["record", "{program}:program", "--out", "{run}"],
    "experiment into a run": ["experiment", "{tmp}/spec.toml", "--out", "{run}"],
    "experiment into a run's checkpoints": ["experiment", "{tmp}/spec.toml", "--out", "{run}/checkpoints"],
    "demo into a run": ["demo", "--quick", "--out", "{run}"],
    "demo inside a run": ["demo", "--quick", "--out", "{run}/demo"],
    "demo into an experiment's runs": ["demo", "--quick", "--out", "{exp}/runs"],
    "fork through a symlink into a run": ["fork", "{run}", "--at", "3", "--perturb", "placebo", "--out", "{tmp}/link/x"],
    "report through a symlink into a run": ["report", "{exp}", "--out", "{tmp}/link/r.html"],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_out_is_refused_and_the_run_untouched(tmp_path, capsys, world, case):
    program, run, exp = world
    (tmp_path / "spec.toml").write_text("name = 'x'\n")
    (tmp_path / "link").symlink_to(run / "checkpoints")
    before, before_exp = snapshot(run), snapshot(exp)
    argv = [a.format(run=run, exp=exp, program=program, tmp=tmp_path) for a in HOSTILE[case]]
    refused(capsys, *argv, needle="inside")
    assert snapshot(run) == before
    assert snapshot(exp) == before_exp


def test_report_does_not_overwrite_a_file_it_did_not_write(tmp_path, capsys, world):
    _, _, exp = world
    mine = tmp_path / "notes.html"
    mine.write_text("my own notes")
    refused(capsys, "report", exp, "--out", mine, needle="--force")
    assert mine.read_text() == "my own notes"
    twin = tmp_path / "page.md"  # the Markdown twin of page.html
    twin.write_text("my markdown")
    refused(capsys, "report", exp, "--out", tmp_path / "page.html", needle="--force")
    assert twin.read_text() == "my markdown" and not (tmp_path / "page.html").exists()
    plots = tmp_path / "fig_plots"  # the plots folder of fig.html: its PNGs would be replaced
    plots.mkdir()
    (plots / "holiday.png").write_bytes(b"\x89PNG mine")
    refused(capsys, "report", exp, "--out", tmp_path / "fig.html", needle="--force")
    assert (plots / "holiday.png").read_bytes() == b"\x89PNG mine"
    refused(capsys, "report", exp, "--out", tmp_path / "fig.md", needle="HTML")


def test_report_with_force_overwrites_and_report_rewrites_its_own_files(tmp_path, capsys, world):
    _, _, exp = world
    mine = tmp_path / "notes.html"
    mine.write_text("my own notes")
    assert main(["report", str(exp), "--out", str(mine), "--force"]) == 0
    assert "replay audit report" in mine.read_text()
    assert main(["report", str(exp), "--out", str(mine)]) == 0  # its own page now: no --force needed
    assert main(["report", str(exp)]) == 0  # the default, EXP/report.html, again


def test_experiment_out_must_be_new_empty_or_an_experiment(tmp_path, capsys, world):
    _, _, exp = world
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("x")
    (tmp_path / "spec.toml").write_text("name = 'x'\n")
    refused(capsys, "experiment", tmp_path / "spec.toml", "--out", busy, needle="not an experiment")
    assert os.listdir(busy) == ["thesis.tex"]
    check_experiment_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_experiment_out(tmp_path / "empty")
    check_experiment_out(exp)  # the same experiment continues there
    early = tmp_path / "early"  # stopped before its spec.json was written
    (early / "evals").mkdir(parents=True)
    check_experiment_out(early)


def test_the_helper_directly(tmp_path, world):
    _, run, exp = world
    assert owning_run(run / "checkpoints" / "x" / "y") == run
    assert owning_run(exp / "runs" / "anything") == exp / "runs"
    assert owning_run(exp / "report.html") is None
    assert owning_run(tmp_path / "new") is None
    for call in (lambda: check_run_out(run / "a"), lambda: check_experiment_out(run),
                 lambda: check_file_out(run / "ledger.sqlite", force=True)):
        with pytest.raises(OutputRefused):
            call()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="not a folder"):
        check_run_out(tmp_path / "file")
    assert check_run_out(tmp_path / "fresh") == tmp_path / "fresh"
    assert issubclass(OutputRefused, ValueError)
